"""End to end: `python -m launch.train` with a Ray teacher actor and DeepSpeed student ranks (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(teacher: Path, student: Path, run_dir: Path, *extra: str) -> list[str]:
    """CLI overrides for a fast run on the tiny models (conf/experiment/tiny.yaml) plus `extra` ones."""
    return [
        "+experiment=tiny",
        f"run_dir={run_dir}",
        f"teacher.model.name_or_path={teacher}",
        f"student.model.name_or_path={student}",
        *extra,
    ]


def run_module(module: str, args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, W&B offline, plus `env`; the output tails are
    printed when it fails, so a failing test shows why."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:])
    return proc


def run_train(overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return run_module("launch.train", overrides, timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def heldout_kl(
    teacher_dir: Path, student_dir: Path, heldout: np.ndarray, student_dtype: torch.dtype = torch.float32
) -> float:
    """KL(teacher‖student) over the held-out tokens, recomputed outside the training processes."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=student_dtype).eval()
    ids = torch.from_numpy(heldout.astype(np.int64))
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
        log_q = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def online_settings(stage: int, precision: str) -> list[str]:
    """The end-to-end runs' overrides: 16 steps, evaluated at 0, 8 and 16 (checkpoints every 4: tiny)."""
    logger = ["logger=wandb", "logger.mode=offline"] if stage == 2 else []
    return [
        f"trainer=zero{stage}",
        f"trainer.precision={precision}",
        *logger,
        "trainer.max_steps=16",
        "trainer.eval_every=8",
        "trainer.lr=1e-2",
    ]


# ZeRO-3 in fp32 (partitioned training, gathered export that reloads) is the features test's zero3 run;
# ZeRO-3 here runs in bf16, the export's dtype and logits checked against the last evaluation
@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (3, "bf16")])
def test_online_distillation_end_to_end(
    stage, precision, request, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    if (stage, precision) == (2, "fp32"):  # the session's run (test_resume resumes against it too)
        run_dir, proc = request.getfixturevalue("zero2_run")
    else:
        run_dir = tmp_path / f"zero{stage}-{precision}"
        proc = run_train(
            tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *online_settings(stage, precision))
        )
    assert proc.returncode == 0
    assert "held-out KL(teacher‖student)" in proc.stdout  # the summary table

    records = metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 16
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    evals = [r for r in records if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert evals[-1]["eval/kl"] < 0.8 * evals[0]["eval/kl"]
    assert evals[-1]["eval/top1_agreement"] > evals[0]["eval/top1_agreement"]

    # the exported student reloads and reproduces the logits it had at the end of training
    heldout = np.load(run_dir / "data" / "heldout.npy")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]  # bf16 training exports bf16 weights
    assert load_file(str(run_dir / "student" / "model.safetensors"))["lm_head.weight"].dtype == dtype
    assert heldout_kl(tiny_teacher_dir, run_dir / "student", heldout, dtype) == pytest.approx(
        evals[-1]["eval/kl"], rel=1e-6
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["kl"] == evals[-1]["eval/kl"] and summary["student"] == str(run_dir / "student")
    assert summary["bytes_per_token"] == 16 * (2 + 2)  # fp16 values + uint16 ids, k=16
    # the capacity plan's stream bytes/token (distill/plan.py) are what the run measured
    from distill.plan import model_shape, plan

    teacher_shape, student_shape = model_shape(tiny_teacher_dir), model_shape(tiny_student_dir)
    hardware = dict(
        gpu_memory_gib=80, usable_fraction=0.9, peak_tflops=989, teacher_mfu=0.4, student_mfu=0.35
    )
    planned = plan(
        teacher_shape, student_shape, seq_len=32, micro_batch=2, teacher_dtype="float32", precision=precision,
        zero_stage=stage, student_gpus=2, gradient_checkpointing=False, loss_chunk=1024, topk=16,
        values_dtype="float16", **hardware,
    )  # fmt: skip
    assert planned["stream_bytes_per_token"] == summary["bytes_per_token"]
    if stage == 2:
        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run written"


def test_loss_normalisation_is_invariant_to_the_split(
    attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """One SGD step on the same global batch (8 sequences) gives the same weights however it is split
    (ranks x accumulation steps x micro-batch): 1 x 4 x 2 == 2 x 2 x 2 == 2 x 1 x 4 (no accumulation). The
    2 x 2 run uses the unfused loss (full logits), so the fused chunked LM-head loss is checked against it
    through the whole stack too."""
    initial = load_file(str(tiny_student_dir / "model.safetensors"))
    results = {}
    for ranks, accum, micro in [(1, 4, 2), (2, 2, 2), (2, 1, 4)]:
        run_dir = tmp_path / f"r{ranks}a{accum}"
        proc = run_train(
            tiny_overrides(
                tiny_teacher_dir,
                tiny_student_dir,
                run_dir,
                "trainer.optimizer=sgd",
                "trainer.lr=1.0",
                "trainer.warmup_steps=0",
                "trainer.grad_clip=0",
                "trainer.max_steps=1",
                f"trainer.num_ranks={ranks}",
                f"trainer.grad_accum_steps={accum}",
                f"trainer.micro_batch_size={micro}",
                "loss.ce_weight=0.5",
                f"trainer.fused_loss={(ranks, accum) != (2, 2)}",
                *attached_teacher,
            )
        )
        assert proc.returncode == 0
        weights = exported_weights(run_dir)
        results[ranks, accum, micro] = torch.cat(
            [weights[k].flatten() - initial[k].flatten() for k in sorted(initial)]
        )
    reference = results[1, 4, 2]
    assert reference.abs().sum() > 1e-3  # the step really moved the weights
    for split, update in results.items():
        torch.testing.assert_close(update, reference, rtol=1e-4, atol=1e-6, msg=f"split {split}")
