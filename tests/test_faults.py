"""A teacher actor killed mid-run (kill -9) is restarted by Ray; its in-flight requests are retried and
the run trains every step exactly once (sample ids recorded and checked), with the same losses as an
undisturbed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_online import ROOT, exported_weights, metrics, run_train, tiny_overrides

from distill.student.checkpoint import latest


def teacher_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::TeacherActor"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_teacher_is_restarted_and_every_step_trains_once(tiny_teacher_dir, tiny_student_dir, tmp_path):
    common = [
        "trainer.max_steps=200",
        "trainer.eval_every=1000",
        "trainer.checkpoint_every=1000",
        "stream.prefetch=3",
        "trainer.record_samples=true",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}

    def start(run_dir):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.train",
                *tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *common),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    calm = start(tmp_path / "calm")
    calm_out = calm.communicate(timeout=600)[0]
    assert calm.returncode == 0, calm_out[-3000:]

    disturbed_dir = tmp_path / "disturbed"
    disturbed = start(disturbed_dir)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until training is under way, then kill the teacher
        steps = (
            [r for r in metrics(disturbed_dir) if "train/loss" in r]
            if (disturbed_dir / "metrics.jsonl").exists()
            else []
        )
        if len(steps) >= 5:
            break
        assert disturbed.poll() is None, disturbed.communicate()[0][-3000:]
        time.sleep(0.2)
    killed_at = len(steps)
    victims = teacher_pids()
    assert victims, "no teacher actor process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out = disturbed.communicate(timeout=600)[0]
    assert disturbed.returncode == 0, out[-3000:]
    assert set(teacher_pids()).isdisjoint(victims)  # the run ended; no killed process came back

    calm_losses = [(r["step"], r["train/loss"]) for r in metrics(tmp_path / "calm") if "train/loss" in r]
    disturbed_losses = [(r["step"], r["train/loss"]) for r in metrics(disturbed_dir) if "train/loss" in r]
    assert killed_at < 150  # the teacher died mid-training, not during the final evaluation
    assert [s for s, _ in disturbed_losses] == list(range(1, 201))  # every step exactly once
    assert disturbed_losses == pytest.approx(calm_losses, rel=1e-6)  # same batches, same teacher outputs

    calm_samples, disturbed_samples = trained_samples(tmp_path / "calm"), trained_samples(disturbed_dir)
    assert sorted(disturbed_samples) == sorted(calm_samples)  # every (rank, step, micro-batch) exactly once
    assert disturbed_samples == calm_samples  # ... with the same sample ids
    for step in range(1, 201):  # in each step the ranks train disjoint samples
        ids = [i for (_, s, _), samples in disturbed_samples.items() if s == step for i in samples]
        assert len(ids) == len(set(ids)) == 2 * 4  # 2 ranks x micro-batch 4 (conf/experiment/tiny.yaml)


def trained_samples(run_dir) -> dict[tuple[int, int, int], list[int]]:
    """(rank, step, micro-batch) -> sample ids, from `trainer.record_samples`; a record seen twice fails."""
    trained = {}
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            r = json.loads(line)
            key = (rank, r["step"], r["micro_batch"])
            assert key not in trained, f"{key} trained twice"
            trained[key] = r["samples"]
    assert len(trained) == 200 * len(list((run_dir / "samples").glob("rank*.jsonl")))
    return trained


def test_a_replica_that_stays_dead_is_dropped_and_none_left_is_a_clear_error(tiny_teacher_dir):
    import numpy as np
    import ray
    from conftest import start_tiny_pool

    from distill.stream import TeacherStream
    from distill.stream.client import TeacherStreamError

    pool = start_tiny_pool(tiny_teacher_dir, "faults", max_restarts=0)
    try:
        batches = [np.full((1, 8), i, dtype=np.uint16) for i in range(6)]
        stream = TeacherStream(pool.actors, topk=4, prefetch=2, values_dtype="float32", timeout_s=60)
        ray.kill(pool.actors[1].handle, no_restart=True)
        served = [out.request_id for _, out in stream.stream(batches, lambda b: b)]
        assert served == list(range(6)) and len(stream.replicas) == 1  # requests of the dead one re-sent

        ray.kill(pool.actors[0].handle, no_restart=True)
        with pytest.raises(TeacherStreamError, match="every teacher replica is dead"):
            list(stream.stream(batches, lambda b: b))
    finally:
        ray.shutdown()


def wait_for_steps(run_dir, proc, n: int, timeout_s: float = 300) -> int:
    """Poll the run's metrics until `n` optimizer steps are logged; returns how many there are."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        steps = [r for r in metrics(run_dir) if "train/loss" in r] if path.exists() else []
        if len(steps) >= n:
            return len(steps)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout_s} s")


def test_losing_every_replica_checkpoints_then_resume_finishes_the_run(
    tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """With no restarts left the run stops with a clear error after checkpointing its last step; a
    rerun with trainer.resume=latest ends with the weights of a run that never lost its teacher."""
    common = ["trainer.max_steps=60", "trainer.eval_every=1000", "trainer.checkpoint_every=1000"]
    calm, lost = tmp_path / "calm", tmp_path / "lost"
    assert run_train(tiny_overrides(tiny_teacher_dir, tiny_student_dir, calm, *common)).returncode == 0

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    args = tiny_overrides(tiny_teacher_dir, tiny_student_dir, lost, *common, "teacher.max_restarts=0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_steps(lost, proc, 5)
    for pid in teacher_pids():
        os.kill(pid, signal.SIGKILL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "the teacher pool is gone" in out and "trainer.resume=latest" in out, out[-3000:]
    trained = [r["step"] for r in metrics(lost) if "train/loss" in r]
    assert 5 <= trained[-1] < 60
    assert latest(lost / "checkpoints").name == f"step-{trained[-1]:06d}"  # nothing trained is lost

    resumed = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, lost, *common, "trainer.resume=latest")
    )
    assert resumed.returncode == 0
    a, b = exported_weights(calm), exported_weights(lost)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert [r["step"] for r in metrics(lost) if "train/loss" in r] == list(range(1, 61))
