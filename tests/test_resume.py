"""Stop after k steps, resume, finish: the same final weights as an uninterrupted run; corrupt = error."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_online import exported_weights, metrics, online_settings, run_train, tiny_overrides
from test_validation import compose_cfg

from distill.student.checkpoint import CheckpointError, latest, list_checkpoints
from launch.train import prepare


def test_resume_reproduces_an_uninterrupted_run(
    zero2_run, attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """Stopped at step 5 of 16 and resumed: the weights and losses of `zero2_run`, the same settings
    trained without a break (checkpoints every 4 steps, the newest 2 kept; conf/experiment/tiny.yaml).
    The two jobs use the session's teacher pool, `zero2_run` a teacher of its own: the same top-k."""
    straight, straight_proc = zero2_run
    assert straight_proc.returncode == 0
    common = [*online_settings(2, "fp32"), "trainer.keep_checkpoints=2", *attached_teacher]
    resumed = tmp_path / "resumed"

    first = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, resumed, *common, "trainer.stop_at_step=5")
    )
    assert first.returncode == 0
    assert not (resumed / "student").exists()  # stopped early: nothing exported yet
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == ["step-000004", "step-000005"]

    second = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, resumed, *common, "trainer.resume=latest")
    )
    assert second.returncode == 0
    assert "resumed from" in second.stdout + second.stderr
    a, b = exported_weights(straight), exported_weights(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    steps = [r["step"] for r in metrics(resumed) if "train/loss" in r]
    assert steps == list(range(1, 17))  # every step trained exactly once across the two jobs
    straight_losses = [r["train/loss"] for r in metrics(straight) if "train/loss" in r]
    resumed_losses = [r["train/loss"] for r in metrics(resumed) if "train/loss" in r]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-5)
    # pruning kept the newest two
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == ["step-000012", "step-000016"]

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


def test_sigterm_without_warning_leaves_the_last_periodic_checkpoint_intact(
    attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """SIGTERM to the driver and every rank mid-run (what Slurm does at a hard kill): the newest
    checkpoint verifies, and the run resumes from it to the end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_online import ROOT

    from distill.student.checkpoint import verify

    run_dir = tmp_path / "run"
    steps = 60  # seconds of training: the kill lands well before the end (it is sent after step 15)
    settings = [f"trainer.max_steps={steps}", "trainer.checkpoint_every=5", "trainer.eval_every=1000"]
    settings += attached_teacher  # the session's teacher pool: only the driver and the ranks are killed
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.train",
            *tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *settings),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while latest(run_dir / "checkpoints") is None or latest(run_dir / "checkpoints").name < "step-000015":
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    ranks = subprocess.run(
        ["pgrep", "-f", f"launch.student {run_dir}"], capture_output=True, text=True
    ).stdout
    for pid in [driver.pid, *map(int, ranks.split())]:
        os.kill(pid, signal.SIGTERM)
    driver.wait(timeout=120)
    newest = latest(run_dir / "checkpoints")
    verify(newest)  # raises if any file of it is missing or corrupt
    stopped_at = int(newest.name.split("-")[1])
    assert stopped_at < steps

    again = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *settings, "trainer.resume=latest")
    )
    assert again.returncode == 0
    trained = [r["step"] for r in metrics(run_dir) if "train/loss" in r]
    assert (run_dir / "student").is_dir()
    assert trained[-(steps - stopped_at) :] == list(range(stopped_at + 1, steps + 1))  # right after it


def test_a_checkpoint_resumes_only_onto_its_own_sample_stream(
    zero2_run, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """Each checkpoint records the data digest, sampler seed and batch geometry it trained with. Carried
    into another run directory (where no config record exists to compare with), it resumes onto the same
    stream and is refused, before anything is written, onto other data, another seed or global batch."""
    import json

    from hydra import compose, initialize_config_dir
    from test_online import ROOT

    from distill.data import TrainWindows
    from distill.student.checkpoint import CheckpointError

    straight, straight_proc = zero2_run
    assert straight_proc.returncode == 0
    recorded = json.loads((latest(straight / "checkpoints") / "state.json").read_text())["data"]
    assert recorded == {
        "digest": TrainWindows(straight / "data").digest,
        "seed": 0,
        "micro_batch_size": 4,
        "grad_accum_steps": 1,
        "num_ranks": 2,
        "global_batch": 8,
        "max_steps": 16,
    }

    def resume_in_copy(name: str, *changes: str):
        run_dir = tmp_path / name
        shutil.copytree(straight / "checkpoints", run_dir / "checkpoints")
        overrides = tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *online_settings(2, "fp32"))
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "trainer.resume=latest", *changes])
        return run_dir, lambda: prepare(cfg, run_dir)

    run_dir, start = resume_in_copy("same")
    assert start()["resume_from"] == latest(run_dir / "checkpoints")  # the same stream: accepted
    for name, change, why in [
        ("other-data", "data.max_train_sequences=256", "the data differs"),
        ("other-seed", "data.seed=1", "data.seed differs"),
        ("other-batch", "trainer.micro_batch_size=2", "the global batch"),
    ]:
        run_dir, start = resume_in_copy(name, change)
        with pytest.raises(CheckpointError, match=why):
            start()
        assert [p.name for p in run_dir.iterdir()] == ["checkpoints"], "a refused resume wrote files"
