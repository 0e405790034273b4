"""The demo's real-teacher path: SmolLM2 GGUF -> Hugging Face folder -> Ray teacher -> 2 DeepSpeed ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_online import metrics, run_train
from transformers import AutoModelForCausalLM


@pytest.mark.slow
def test_demo_composition_trains_on_the_real_teacher(smollm2_dir, tmp_path):
    run_dir = tmp_path / "demo"
    proc = run_train(
        [
            f"run_dir={run_dir}",
            "logger=none",
            "trainer.max_steps=4",
            "trainer.warmup_steps=1",
            "trainer.eval_every=100",
            "trainer.checkpoint_every=100",
            "data.heldout_sequences=2",
            "data.max_train_sequences=64",
        ],
        timeout=900,
    )
    assert proc.returncode == 0
    evals = [r for r in metrics(run_dir) if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert (
        evals[-1]["eval/kl"] < 0.5 * evals[0]["eval/kl"]
    )  # the pruned student starts far off and learns fast
    assert 5 < evals[0]["eval/teacher_ppl"] < 50  # a real language model on real prose
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bytes_per_token"] == 64 * (2 + 2)
    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == 49152
    assert np.isfinite(summary["after"]["ppl"])
