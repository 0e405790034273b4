"""Stop after k steps, resume, finish: the same final weights as an uninterrupted run; corrupt = error."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_online import exported_weights, metrics, run_train, tiny_overrides
from test_validation import compose_cfg

from distill.student.checkpoint import CheckpointError, latest, list_checkpoints
from launch.train import prepare


def test_resume_reproduces_an_uninterrupted_run(tiny_teacher_dir, tiny_student_dir, tmp_path):
    common = [
        "trainer.max_steps=6",
        "trainer.checkpoint_every=2",
        "trainer.keep_checkpoints=2",
        "trainer.eval_every=100",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(tiny_overrides(tiny_teacher_dir, tiny_student_dir, straight, *common)).returncode == 0

    first = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, resumed, *common, "trainer.stop_at_step=3")
    )
    assert first.returncode == 0
    assert not (resumed / "student").exists()  # stopped early: nothing exported yet
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == ["step-000002", "step-000003"]

    second = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, resumed, *common, "trainer.resume=latest")
    )
    assert second.returncode == 0
    assert "resumed from" in second.stdout + second.stderr
    a, b = exported_weights(straight), exported_weights(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    steps = [r["step"] for r in metrics(resumed) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step trained exactly once across the two jobs
    straight_losses = [r["train/loss"] for r in metrics(straight) if "train/loss" in r]
    resumed_losses = [r["train/loss"] for r in metrics(resumed) if "train/loss" in r]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-5)
    # pruning kept the newest two
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == ["step-000004", "step-000006"]

    # a corrupt checkpoint is refused before anything starts, never silently replaced by a fresh run
    ckpt = latest(resumed / "checkpoints")
    victim = next((ckpt / "ds").glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    cfg = compose_cfg(tiny_teacher_dir, tiny_student_dir, "trainer.resume=latest")
    with pytest.raises(CheckpointError, match="fails its checksum"):
        prepare(cfg, resumed)
    # and a half-written one (no manifest) is never taken as the latest
    shutil.copytree(ckpt, resumed / "checkpoints" / ".tmp-step-000008")
    assert latest(resumed / "checkpoints") == ckpt
