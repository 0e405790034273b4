"""A 2-phase curriculum through the CLI: phase 1 distils from two routed teachers (Meta's mixture recipe),
phase 2 from one of them. Phase 1's teacher processes are gone before phase 2's start; phase 2 starts
from phase 1's weights; a run preempted in phase 2 (SIGUSR1 to the driver, as Slurm sends it) exits with
75 and no teacher left, resumes in phase 2 (phase 1 is not redone) and ends with the weights of an
uninterrupted phase 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_online import ROOT, exported_weights, metrics, run_train

from distill.models import tiny_llama


@pytest.fixture(scope="module")
def licenses_teacher_dir(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    """A second tiny teacher, briefly trained on another real corpus (Debian's license texts)."""
    from conftest import train_briefly
    from transformers import AutoModelForCausalLM

    from distill.data import load_documents, pack_documents
    from distill.models import load_tokenizer

    folder = tiny_llama(
        tmp_path_factory.mktemp("licenses-teacher"),
        hidden_size=64,
        num_layers=3,
        seed=3,
        tokenizer_dir=tiny_tokenizer_dir,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokens = pack_documents(load_documents("common_licenses"), load_tokenizer(folder), 32).tokens
    train_briefly(model, tokens, steps=60, batch=16, seed=0)
    model.save_pretrained(folder)
    return folder


PHASE2_STEPS = 60  # a few seconds: long enough to be preempted in the middle


def curriculum_overrides(python: Path, licenses: Path, student: Path, run_dir: Path) -> list[str]:
    return [
        "+experiment=tiny",
        f"run_dir={run_dir}",
        f"teacher.model.name_or_path={python}",
        f"student.model.name_or_path={student}",
        "data.sources=[{name:python,source:pydoc_topics},{name:licenses,source:common_licenses}]",
        f"+teachers={{python:{{model:{{name_or_path:{python}}}}},licenses:{{model:{{name_or_path:{licenses}}}}}}}",
        "+routing={python:python,licenses:licenses}",
        "+curriculum=[{name:mixture,max_steps:4},"
        f"{{name:licenses,max_steps:{PHASE2_STEPS},sources:[licenses]}}]",
        "trainer.num_ranks=1",
        "trainer.checkpoint_every=1000",  # a phase's end and a preemption checkpoint, nothing else
        "trainer.eval_every=1000",
        "trainer.resume=auto",
    ]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def trained_steps(run_dir: Path) -> list[int]:
    """Steps in the metrics file so far (complete lines only: the run may be writing the last one)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def test_two_phases_release_teachers_and_resume_in_phase_two_after_preemption(
    tiny_teacher_dir, licenses_teacher_dir, tiny_student_dir, tmp_path
):
    run_dir = tmp_path / "preempted"
    first, second = run_dir / "phase-0-mixture", run_dir / "phase-1-licenses"
    args = curriculum_overrides(tiny_teacher_dir, licenses_teacher_dir, tiny_student_dir, run_dir)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    driver_log = tmp_path / "driver.log"
    with driver_log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.train", *args], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    # while phase 2 runs, phase 1's teacher processes (both teachers) must already be gone
    checked, signalled = False, False
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (second / "teachers.json").is_file() and not checked:
            phase1 = json.loads((first / "teachers.json").read_text())
            phase2 = json.loads((second / "teachers.json").read_text())
            assert len(phase1["pids"]) == 2 and len(phase2["pids"]) == 1
            assert not any(alive(pid) for pid in phase1["pids"]), "phase-1 teachers still running"
            assert all(name.endswith("licenses/teacher-0") for name in phase2["actors"])
            checked = True
        if checked and not signalled and len(trained_steps(second)) >= 2:
            os.kill(proc.pid, signal.SIGUSR1)  # to the driver only: it must pass it on to the rank
            signalled = True
        time.sleep(0.1)
    proc.wait(timeout=60)
    log = driver_log.read_text()
    assert proc.returncode == 75, log[-3000:]
    found = re.search(
        r"preempted at step (\d+) of phase 1 \(licenses\); rerun the same command with "
        r"trainer.resume=auto",
        log,
    )
    assert found, log[-3000:]
    stopped = int(found.group(1))
    assert 2 <= stopped < PHASE2_STEPS and trained_steps(second) == list(range(1, stopped + 1))
    assert (second / "checkpoints" / f"step-{stopped:06d}").is_dir() and not (second / "student").exists()
    assert not any(alive(pid) for pid in phase1["pids"] + phase2["pids"]), "teachers left running"
    state = json.loads((run_dir / "curriculum.json").read_text())
    assert [p["status"] for p in state["phases"]] == ["done", "preempted"]
    assert trained_steps(first) == [1, 2, 3, 4]
    final = state["phases"][0]["summary"]["eval"]  # every domain, against both teachers
    assert {"python/kl_python", "python/kl_licenses", "licenses/kl_licenses", "licenses/ppl"} <= set(final)

    # phase 2 starts from phase 1's final weights: its step-0 evaluation repeats phase 1's last one
    start = next(r for r in metrics(second) if "eval/kl" in r)
    assert start["step"] == 0
    assert start["eval/licenses/kl_licenses"] == pytest.approx(final["licenses/kl_licenses"], rel=1e-6)

    phase1_log = (first / "metrics.jsonl").read_text()
    resumed = run_train(args)  # the same command (it has trainer.resume=auto)
    assert resumed.returncode == 0
    assert "phase 0 (mixture) already done" in resumed.stdout + resumed.stderr
    assert (
        f"resumed from {second / 'checkpoints' / f'step-{stopped:06d}'} at step {stopped}" in resumed.stderr
    )
    assert (first / "metrics.jsonl").read_text() == phase1_log  # phase 1 was not trained again
    assert trained_steps(second) == list(range(1, PHASE2_STEPS + 1))  # each step once

    # the uninterrupted reference: phase 2 in one go from the same finished phase 1 (copied: phase 1 is
    # deterministic and rerunning it would only cost time)
    straight = tmp_path / "straight"
    shutil.copytree(first, straight / first.name)
    state["phases"] = state["phases"][:1]
    (straight / "curriculum.json").write_text(json.dumps(state))
    args = curriculum_overrides(tiny_teacher_dir, licenses_teacher_dir, tiny_student_dir, straight)
    assert run_train(args).returncode == 0
    a, b = exported_weights(straight / "phase-1-licenses"), exported_weights(second)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    straight_losses = [r["train/loss"] for r in metrics(straight / "phase-1-licenses") if "train/loss" in r]
    resumed_losses = [r["train/loss"] for r in metrics(second) if "train/loss" in r]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-5)
