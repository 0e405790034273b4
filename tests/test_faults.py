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

STEPS = 40  # the teacher is killed after 5 steps: the other 35 (seconds of training) run on its successor
# both fault tests train this; one undisturbed run of it is their reference (`calm_run`)
COMMON = [
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=1000",
    "trainer.checkpoint_every=1000",
    "stream.prefetch=3",
    "trainer.record_samples=true",
]


def teacher_pids(driver: int | None = None) -> list[int]:
    """Teacher actor processes: every one on this machine, or only those started under `driver` (its
    local Ray runtime's workers), so that a test kills its own run's teacher and nobody else's."""
    out = subprocess.run(["pgrep", "-f", "ray::TeacherActor"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return pids if driver is None else [p for p in pids if driver in ancestors(p)]


def ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
        found.add(pid)
    return found


def start_train(run_dir, *overrides: str, teacher, student) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", *tiny_overrides(teacher, student, run_dir, *overrides)],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def calm_run(attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """The undisturbed run both fault tests compare against (same settings, same seed), on the session's
    teacher pool (the disturbed runs start, and lose, teachers of their own)."""
    run_dir = tmp_path_factory.mktemp("faults") / "calm"
    overrides = tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *COMMON, *attached_teacher)
    assert run_train(overrides).returncode == 0
    return run_dir


def test_killed_teacher_is_restarted_and_every_step_trains_once(
    calm_run, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    disturbed_dir = tmp_path / "disturbed"
    disturbed = start_train(disturbed_dir, *COMMON, teacher=tiny_teacher_dir, student=tiny_student_dir)
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
    victims = teacher_pids(disturbed.pid)
    assert victims, "no teacher actor process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out = disturbed.communicate(timeout=600)[0]
    assert disturbed.returncode == 0, out[-3000:]
    assert set(teacher_pids()).isdisjoint(victims)  # the run ended; no killed process came back

    calm_losses = [(r["step"], r["train/loss"]) for r in metrics(calm_run) if "train/loss" in r]
    disturbed_losses = [(r["step"], r["train/loss"]) for r in metrics(disturbed_dir) if "train/loss" in r]
    assert killed_at < STEPS // 2  # the teacher died mid-training, not during the final evaluation
    assert [s for s, _ in disturbed_losses] == list(range(1, STEPS + 1))  # every step exactly once
    assert disturbed_losses == pytest.approx(calm_losses, rel=1e-6)  # same batches, same teacher outputs

    calm_samples, disturbed_samples = trained_samples(calm_run), trained_samples(disturbed_dir)
    assert sorted(disturbed_samples) == sorted(calm_samples)  # every (rank, step, micro-batch) exactly once
    assert disturbed_samples == calm_samples  # ... with the same sample ids
    for step in range(1, STEPS + 1):  # in each step the ranks train disjoint samples
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
    assert len(trained) == STEPS * len(list((run_dir / "samples").glob("rank*.jsonl")))
    return trained


def test_a_replica_that_stays_dead_is_dropped_and_none_left_is_a_clear_error(ray_runtime, tiny_teacher_dir):
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
        pool.shutdown()


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
    calm_run, attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """With no restarts left the run stops with a clear error after checkpointing its last step; a
    rerun with trainer.resume=latest ends with the weights of a run that never lost its teacher."""
    lost = tmp_path / "lost"
    no_restarts = [*COMMON, "teacher.max_restarts=0"]
    proc = start_train(lost, *no_restarts, teacher=tiny_teacher_dir, student=tiny_student_dir)
    wait_for_steps(lost, proc, 5)
    victims = teacher_pids(proc.pid)
    assert victims, "no teacher actor process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "the teacher stopped serving" in out and "trainer.resume=latest" in out, out[-3000:]
    trained = [r["step"] for r in metrics(lost) if "train/loss" in r]
    assert 5 <= trained[-1] < STEPS
    assert latest(lost / "checkpoints").name == f"step-{trained[-1]:06d}"  # nothing trained is lost

    resumed = run_train(  # on the session's pool: the teacher is back (same model, same top-k)
        tiny_overrides(
            tiny_teacher_dir, tiny_student_dir, lost, *no_restarts, "trainer.resume=latest", *attached_teacher
        )
    )
    assert resumed.returncode == 0
    a, b = exported_weights(calm_run), exported_weights(lost)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert [r["step"] for r in metrics(lost) if "train/loss" in r] == list(range(1, STEPS + 1))


def test_an_error_inside_the_teacher_stops_every_rank_with_its_message(
    tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """The teacher's own exception (here its float16 overflow check on hidden states, with an overflowing
    teacher) reaches every rank at the same step: both ranks stop with TEACHER_FAILED_EXIT, and the run
    ends with the teacher's message and what to do, not with a dead-pool message or a hung collective."""
    from test_stream import overflowing_teacher

    from launch.student import TEACHER_FAILED_EXIT

    teacher = overflowing_teacher(tiny_teacher_dir, tmp_path / "overflowing")
    run_dir = tmp_path / "run"
    proc = run_train(
        tiny_overrides(
            teacher,
            tiny_student_dir,
            run_dir,
            "features.layer_map=0:1",
            "trainer.max_steps=2",
            "ray.num_cpus=2",
        )
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "teacher raised ValueError" in log and "overflow float16" in log, log[-3000:]
    assert "the teacher stopped serving" not in log and "trainer.resume=latest" in log
    assert "stopped before completing a step" in log  # the first request failed: nothing to checkpoint
    assert log.count(f"exited with code {TEACHER_FAILED_EXIT}") == 0  # all ranks agreed: no rank failure
    assert sorted(p.name for p in run_dir.glob("teacher-error-rank*.txt"))  # the ranks that received it
