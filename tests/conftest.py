"""Shared fixtures: tiny models (fast, random) and the real SmolLM2 teacher (slow, first use converts it)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.models import smollm2_folder, tiny_llama, tiny_tokenizer
from distill.teacher import TeacherPool, connect_ray


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One byte-level BPE (vocab 256) shared by the tiny teacher and student, as distillation requires."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"), vocab_size=256)


def pretrain_on_pydoc(
    model_dir: Path, steps: int = 150, seq_len: int = 32, batch: int = 16, seed: int = 0
) -> None:
    """A few hundred ms of plain next-token training on real text, so the tiny teacher has real,
    learnable structure (a random teacher's distributions are noise no student can follow)."""
    from distill.data import load_documents, pack_documents
    from distill.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens = pack_documents(load_documents("pydoc_topics"), load_tokenizer(model_dir), seq_len).tokens
    train_briefly(model, tokens, steps, batch, seed)
    model.save_pretrained(model_dir)


def train_briefly(model, tokens, steps: int, batch: int, seed: int) -> None:
    """AdamW next-token steps on random rows of `tokens`, on one thread: the ops are tiny, and a second
    thread only contends with the test's other processes on a small machine (4x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            rows = torch.randint(0, len(tokens), (batch,), generator=generator)
            ids = torch.from_numpy(tokens[rows.numpy()].astype("int64"))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Tiny Llama briefly trained on pydoc text (held-out perplexity well below the 256-token vocab)."""
    folder = tiny_llama(
        tmp_path_factory.mktemp("tiny-teacher"),
        hidden_size=64,
        num_layers=3,
        seed=1,
        tokenizer_dir=tiny_tokenizer_dir,
    )
    pretrain_on_pydoc(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return tiny_llama(
        tmp_path_factory.mktemp("tiny-student"),
        hidden_size=48,
        num_layers=2,
        seed=2,
        tokenizer_dir=tiny_tokenizer_dir,
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real converted teacher in the default cache; only for tests marked slow."""
    return smollm2_folder()


@pytest.fixture(scope="session")
def ray_runtime():
    """One Ray runtime local to this test process, started on first use and shared by every test that
    talks to teacher actors in-process (each start costs seconds). 3 logical CPUs: the shared pool below
    (1) next to a test's own actors (at most 1.5: 3 pipeline stages of 0.5). Tests stop their own actors
    and never shut Ray down; CLI runs start runtimes of their own."""
    import ray

    connect_ray(None, num_cpus=3)
    yield
    ray.shutdown()


def run_script(script: str, *args: str) -> str:
    """Run `script` (`python -c`) with `args` in a fresh single-threaded process: its stdout, else the end of
    its stderr. The memory-cap tests set their own RLIMIT_AS inside the script, after their imports."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return proc.stdout.strip() or proc.stderr[-2000:]


def start_tiny_pool(model_dir: Path, run_tag: str, replicas: int = 2, max_restarts: int = 3) -> TeacherPool:
    """`replicas` of a tiny teacher as real Ray actors, on the session's Ray runtime (`ray_runtime`)."""
    return TeacherPool.start(
        run_tag, str(model_dir), replicas, "float32", "sdpa", 1, 0.5, 0, max_restarts=max_restarts
    )


@pytest.fixture(scope="session")
def tiny_teacher_pool(ray_runtime, tiny_teacher_dir: Path):
    """2 replicas of the tiny teacher, shared by the session (read-only: no test kills or restarts them)."""
    pool = start_tiny_pool(tiny_teacher_dir, "test-pool")
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def attached_teacher(tiny_teacher_pool) -> list[str]:
    """Overrides with which a CLI run uses `tiny_teacher_pool` (`teacher.attach`, joining this session's
    Ray runtime by address) instead of starting a Ray runtime and a teacher actor of its own: for runs
    whose subject is not how the teacher starts (resume, the loss split, features, references). Same
    model, dtype and attention as a run's own tiny teacher, so the same top-k; the ranks are separate
    processes reaching real actors through Ray either way."""
    import ray

    return [
        f"ray.address={ray.get_runtime_context().gcs_address}",
        "teacher.attach=test-pool",
        "teacher.replicas=2",
    ]


@pytest.fixture(scope="session")
def zero2_run(tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted ZeRO-2 fp32 run through the CLI (test_online's end-to-end settings, W&B offline):
    test_online checks it, test_resume resumes an interrupted copy of it and compares. (run dir, process)"""
    from test_online import online_settings, run_train, tiny_overrides

    run_dir = tmp_path_factory.mktemp("zero2-fp32") / "run"
    proc = run_train(tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *online_settings(2, "fp32")))
    return run_dir, proc
