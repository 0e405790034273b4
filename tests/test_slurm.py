"""The real sbatch scripts on a real (private, multi-node, one-host) Slurm cluster, with the tiny models.

The session fixture starts the cluster with `slurm/local-cluster/start.sh` (root only; installs Debian's
slurm-wlm + munge on first use) and stops it at the end if it started it. Jobs inherit this process's
environment (sbatch exports it), so they see the same Python and the project on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_online import exported_weights, metrics, run_train, tiny_overrides
from test_routing import SOURCES, two_teachers

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "slurm" / "local-cluster"
SLURM_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/local-slurm"))
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm_env() -> dict:
    if os.geteuid() != 0:  # CI runs as root: there the Slurm tests must run, never skip silently
        reason = "the private Slurm cluster (slurm/local-cluster/start.sh) needs root"
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    env = {**os.environ, "SLURM_LOCAL_DIR": str(SLURM_DIR), "SLURM_LOCAL_NODES": "4"}
    pid_file = SLURM_DIR / "run" / "slurmctld.pid"
    was_running = pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
    subprocess.run(["bash", str(CLUSTER / "start.sh")], env=env, check=True, capture_output=True, timeout=300)
    job_env = {
        **env,
        "SLURM_CONF": str(SLURM_DIR / "etc" / "slurm.conf"),
        "PYTHONPATH": str(ROOT),
        "PYTHON": sys.executable,
        "WANDB_MODE": "offline",
    }
    yield job_env
    if not was_running:
        subprocess.run(["bash", str(CLUSTER / "stop.sh")], env=env, capture_output=True, timeout=120)


def job_info(env: dict, job_id: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


def wait_job(env: dict, job_id: str, timeout: float, restarts: int = 0) -> dict:
    """Poll `scontrol show job` until the job ends (after at least `restarts` requeues)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in FINAL and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    raise TimeoutError(f"job {job_id} still {job_info(env, job_id).get('JobState')} after {timeout} s")


def submit(env: dict, script: str, run_dir: Path, overrides: list[str], *sbatch_args: str) -> str:
    overrides = [o for o in overrides if not o.startswith("run_dir=")]  # the script owns run_dir
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={run_dir.parent}/{run_dir.name}-%j.out",
            f"--export=ALL,RUN_DIR={run_dir}",
            *sbatch_args,
            str(ROOT / "slurm" / script),
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip().split(";")[0]


def job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir.parent / f"{run_dir.name}-{job_id}.out").read_text()


def assert_trained(run_dir: Path, steps: int) -> None:
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == list(range(1, steps + 1))
    assert (run_dir / "student" / "model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["kl"] < summary["before"]["kl"]


SCRIPTS = ["distill.sbatch", "distill-het.sbatch"]


@pytest.fixture(scope="module")
def pair_jobs(slurm_env, tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """The jobs of the two script-parametrised tests below, all four submitted at once: each takes one CPU
    on each of 2 nodes, so the cluster (4 nodes x 2 CPUs) runs them side by side and their starts overlap
    instead of queueing one after another. {(test, script): (run dir, job id)}. Jobs still queued or
    running when the module ends (a test failed or was deselected) are cancelled."""
    overrides = {
        "run": lambda run_dir: tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir),
        "plain": lambda run_dir: tiny_overrides(
            Path("/no/teacher/needed"), tiny_student_dir, run_dir, "teacher.source=none"
        ),
    }
    jobs = {}
    for name, make in overrides.items():
        for script in SCRIPTS:
            run_dir = tmp_path_factory.mktemp(f"{name}-{script}") / name
            jobs[name, script] = run_dir, submit(slurm_env, script, run_dir, make(run_dir))
    yield jobs
    for _, job in jobs.values():
        if job_info(slurm_env, job).get("JobState", "COMPLETED") not in FINAL:
            subprocess.run(["scancel", job], env=slurm_env)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_node_run_trains_and_exports(script, slurm_env, pair_jobs):
    """Submitted with the other script's and the next test's jobs (`pair_jobs`); each test checks its own."""
    run_dir, job = pair_jobs["run", script]
    info = wait_job(slurm_env, job, timeout=240)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    roles = re.search(r"teachers (node\d+), students (node\d+) x 1 ranks", log)  # any 2 of the 4 nodes
    assert roles and roles[1] != roles[2], log[-4000:]  # one node per role
    assert_trained(run_dir, 8)
    assert not list(Path("/tmp").glob(f"ray-distill-{job}")), "the job left its Ray directory behind"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_without_a_live_teacher_starts_no_ray(script, slurm_env, pair_jobs):
    """teacher.source=none (cached alike): the scripts start neither Ray nor the teacher pool (the jobs
    were submitted with the previous test's, `pair_jobs`)."""
    run_dir, job = pair_jobs["plain", script]
    info = wait_job(slurm_env, job, timeout=240)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "teacher.source=none: no Ray and no teacher pool" in log
    assert not list(run_dir.glob("ray-*.log")) and not (run_dir / "teacher.json").exists()
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == list(range(1, 9))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["after"]["ppl"] < summary["before"]["ppl"] and "kl" not in summary["after"]


def test_several_routed_teachers_on_slurm(slurm_env, tiny_teacher_dir, tiny_student_dir, tmp_path):
    """`teachers:` + `routing:` through distill.sbatch: the teacher host starts one pool per teacher, the
    ranks on the student node attach to both; each domain is evaluated against its own teacher."""
    run_dir = tmp_path / "routed"
    overrides = tiny_overrides(
        tiny_teacher_dir,
        tiny_student_dir,
        run_dir,
        SOURCES,
        two_teachers(tiny_teacher_dir, tiny_student_dir),
        "+routing={python:a,licenses:b}",
    )
    teacher_cpus = {**slurm_env, "TEACHER_CPUS": "2"}  # 1 CPU per teacher
    job = submit(teacher_cpus, "distill.sbatch", run_dir, overrides)
    info = wait_job(slurm_env, job, timeout=300)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    pools = json.loads((run_dir / "teachers.json").read_text())["actors"]
    assert sorted(name.split("/")[0].rsplit(".", 1)[1] for name in pools) == ["a", "b"]  # <run tag>.<name>
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == list(range(1, 9))
    evals = [r for r in metrics(run_dir) if "eval/kl" in r]
    assert {"eval/python/kl_a", "eval/licenses/kl_b"} <= set(evals[-1])  # each domain, every teacher
    assert evals[-1]["eval/kl"] < evals[0]["eval/kl"]  # KL to the routed teachers fell
    assert (run_dir / "student" / "model.safetensors").is_file()


def test_requeue_resumes_to_the_uninterrupted_weights(
    slurm_env, attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """The job, warned mid-run, checkpoints, requeues itself and resumes: the weights of the same settings
    trained without a break (the reference runs locally on the session's teacher pool, `attached_teacher`:
    the same model, dtype and top-k as the job's own teacher, without a second Ray runtime and teacher
    starting next to the job's)."""
    steps = 100  # the warning is sent after step 20; the ranks stop within a few steps of it
    common = [
        "trainer.num_ranks=1",
        f"trainer.max_steps={steps}",
        "trainer.checkpoint_every=50",
        "trainer.eval_every=1000",
        "trainer.log_every=50",
    ]
    run_dir, straight = tmp_path / "preempted", tmp_path / "straight"
    job = submit(
        slurm_env,
        "distill.sbatch",
        run_dir,
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *common),
    )
    # the uninterrupted reference, locally, while the job starts
    reference = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, straight, *common, *attached_teacher)
    )
    assert reference.returncode == 0

    # mid-run, deliver the warning exactly as `--signal=B:USR1@...` does: to the batch shell only
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").exists() or not [r for r in metrics(run_dir) if r["step"] >= 20]:
        assert time.monotonic() < deadline and job_info(slurm_env, job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)

    info = wait_job(slurm_env, job, timeout=300, restarts=1)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "SIGUSR1" in log and "requeueing job" in log and "resumed from" in log
    assert_trained(run_dir, steps)  # every step trained exactly once across the two starts
    a, b = exported_weights(straight), exported_weights(run_dir)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_sweep_submits_one_job_per_point(slurm_env, tiny_teacher_dir, tiny_student_dir, tmp_path):
    sweep = tmp_path / "sweep-t"
    overrides = tiny_overrides(
        tiny_teacher_dir, tiny_student_dir, sweep, "logger=wandb", "trainer.num_ranks=1"
    )
    overrides = [o for o in overrides if not o.startswith("run_dir=")]
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}"]
        + ["loss.temperature=1,4", *overrides],
        cwd=ROOT,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for point, temperature in enumerate([1.0, 4.0]):
        run_dir = sweep / str(point)
        assert_trained(run_dir, 8)
        cfg = (run_dir / "config.yaml").read_text()
        assert f"temperature: {temperature}" in cfg
        assert "group: sweep-t\n" in cfg and f"name: sweep-t-{point}\n" in cfg  # one W&B group
        assert list((run_dir / "wandb").glob("offline-run-*"))
    job_ids = {p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}
    assert len(job_ids) == 2  # one Slurm job (array task <id>_<point>) per point


def test_tokenise_as_an_array_job_equals_one_process(slurm_env, tiny_tokenizer_dir, tmp_path):
    """slurm/tokenize.sbatch: 3 array tasks share the pieces; the result is byte-identical to one process."""
    from test_data import file_bytes, pydoc_jsonl

    from distill.data.tokenize import TokenizeSpec, tokenize

    pydoc_jsonl(tmp_path / "corpus.jsonl", copies=2)
    args = [f"source={tmp_path / 'corpus.jsonl'}", f"tokenizer={tiny_tokenizer_dir}", "shard_bytes=150000"]
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-2",
            f"--output={tmp_path}/tok-%A_%a.out",
            str(ROOT / "slurm" / "tokenize.sbatch"),
            *args,
            f"out={tmp_path / 'array'}",
        ],
        cwd=ROOT,
        env=slurm_env,
        capture_output=True,
        text=True,
        check=True,
    )
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], env=slurm_env, capture_output=True, text=True)
        if not queued.stdout.strip():
            break
        time.sleep(0.5)
    logs = sorted(tmp_path.glob(f"tok-{job}_*.out"))
    assert len(logs) == 3, [p.read_text()[-2000:] for p in logs]
    assert all(f"array task {i} of 3" in log.read_text() for i, log in enumerate(logs))
    spec = TokenizeSpec(
        str(tmp_path / "corpus.jsonl"), str(tiny_tokenizer_dir), heldout_fraction=0.01, shard_bytes=150000
    )
    tokenize(spec, tmp_path / "local")
    assert (tmp_path / "array" / "manifest.json").is_file(), [log.read_text()[-2000:] for log in logs]
    assert file_bytes(tmp_path / "array") == file_bytes(tmp_path / "local")
