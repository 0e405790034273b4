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
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = torch.randint(0, len(tokens), (batch,), generator=generator)
        ids = torch.from_numpy(tokens[rows.numpy()].astype("int64"))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)


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


def start_tiny_pool(model_dir: Path, run_tag: str, replicas: int = 2, max_restarts: int = 3) -> TeacherPool:
    """`replicas` of a tiny teacher as real Ray actors, on a Ray runtime local to this test process."""
    connect_ray(None, num_cpus=2)
    return TeacherPool.start(
        run_tag, str(model_dir), replicas, "float32", "sdpa", 1, 0.5, 0, max_restarts=max_restarts
    )


@pytest.fixture(scope="module")
def tiny_teacher_pool(tiny_teacher_dir: Path):
    import ray

    pool = start_tiny_pool(tiny_teacher_dir, "test-pool")
    yield pool
    pool.shutdown()
    ray.shutdown()
