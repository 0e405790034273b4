"""Synthetic data: teacher generation, prompt-masked packing, and training with no teacher (plain CE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_online import metrics, run_train, tiny_overrides
from transformers import AutoModelForCausalLM

from distill.losses.ce import cross_entropy, fused_cross_entropy


def student_ppl(student_dir: Path, sequences: np.ndarray, positions: np.ndarray | None = None) -> float:
    """Perplexity of an exported student on `sequences`, recomputed outside the training processes."""
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(sequences.astype(np.int64))
    with torch.no_grad():
        log_q = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    nll = -log_q.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    counted = torch.ones_like(nll, dtype=torch.bool) if positions is None else torch.from_numpy(positions)
    return float(torch.exp(nll[counted[:, : nll.shape[1]]].mean()))


def test_fused_cross_entropy_matches_float64_reference():
    """The chunked LM-head CE equals plain CE on full logits (value and both gradients), masked rows out."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    labels[:, -1] = -100
    mask = torch.rand(3, 7, generator=gen) > 0.4
    ref = cross_entropy(hidden @ weight.T, labels, mask, 11.0)
    out = fused_cross_entropy(hidden, weight, labels, mask, 11.0, chunk_size=4)
    counted = mask & (labels != -100)
    manual = torch.nn.functional.cross_entropy((hidden @ weight.T)[counted], labels[counted], reduction="sum")
    torch.testing.assert_close(ref.loss, manual / 11.0)
    torch.testing.assert_close(out.loss, ref.loss)
    assert out.metrics == pytest.approx(ref.metrics) and ref.metrics["tokens"] == counted.sum()
    for a, b in zip(
        torch.autograd.grad(ref.loss, (hidden, weight)), torch.autograd.grad(out.loss, (hidden, weight))
    ):
        torch.testing.assert_close(a, b)


def test_no_teacher_trains_on_plain_text(tiny_student_dir, tmp_path):
    """teacher.source=none on pydoc text (how specialist teachers are trained): no Ray, no teacher folder
    needed; held-out perplexity falls and the exported student reproduces the final eval."""
    run_dir = tmp_path / "plain"
    proc = run_train(
        tiny_overrides(
            Path("/no/teacher/needed"),
            tiny_student_dir,
            run_dir,
            "teacher.source=none",
            "trainer.max_steps=12",
            "trainer.eval_every=12",
            "trainer.lr=1e-2",
        )
    )
    assert proc.returncode == 0
    records = metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    evals = [r for r in records if "eval/ppl" in r]
    assert [r["step"] for r in evals] == [0, 12] and "eval/kl" not in evals[0]
    assert evals[-1]["eval/ppl"] < 0.8 * evals[0]["eval/ppl"]
    assert "student perplexity" in proc.stdout and "KL" not in proc.stdout
    heldout = np.load(run_dir / "data" / "heldout.npy")
    assert student_ppl(run_dir / "student", heldout) == pytest.approx(evals[-1]["eval/ppl"], rel=1e-5)
    assert json.loads((run_dir / "models.json").read_text())["teacher"] is None
