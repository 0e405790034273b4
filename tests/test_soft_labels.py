"""Soft labels from one generation pass: `launch.generate store=topk` keeps the teacher's top-k on every
completion token; `launch.cache cache.from_generation=true` lays them out on the packed `data=completions`
rows as a teacher cache; `teacher=cached` trains with KD on the completions, no second teacher pass.

Checked against the live tiny teacher: the converted signals at completion positions are its top-k on the
packed rows (and its log-prob of each held-out completion token), prompt/padding positions hold NaN
filler that the loss never reads, cached training starts from the online run's loss and learns, and a
generation the conversion cannot serve is refused before compute with the fix named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_online import ROOT, metrics, run_module, run_train, tiny_overrides
from test_synthetic import generation_overrides, run_generate
from transformers import AutoTokenizer

from distill.cache import CachedTeacher, CacheError
from distill.cache.codec import decode_float32, decode_values, encode_values
from distill.cache.generation import shard
from distill.data import TrainWindows
from distill.data.completions import load_completions, pack_examples, position_mask
from distill.data.corpus import DataError
from distill.data.prepare import prepare_datasets
from distill.data.prompts import pydoc_prompts
from distill.models import load_tokenizer, tiny_tokenizer
from distill.teacher.actor import TeacherActor
from launch.cache import write

K, HELDOUT = 8, 0.25


@pytest.fixture(scope="module")
def generation(tiny_teacher_dir, tmp_path_factory) -> tuple[Path, int]:
    """The tiny teacher's completions with top-8 stored (16 prompts of similar length, 2 samples each),
    and a data.seq_len that puts every example in a window of its own (longer than any prompt, shorter
    than any two examples), so a live teacher on the packed rows sees what the generator saw."""
    prompts = [p for p in pydoc_prompts() if 55 <= len(p) <= 75][:16]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = path.parent / "generated"
    overrides = generation_overrides(tiny_teacher_dir, path, out, "batch_size=4", "store=topk", f"topk={K}")
    assert run_generate(overrides).returncode == 0
    rows = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["prompt_ids", "completion_ids"])
    rows = rows.to_pylist()
    seq_len = max(len(r["prompt_ids"]) for r in rows) + 16
    assert seq_len < 2 * min(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    return out, seq_len


def cache_overrides(teacher: Path, generated: Path, seq_len: int, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "teacher=local",
        f"teacher.model.name_or_path={teacher}",
        "teacher.dtype=float32",
        f"cache.path={cache_dir}",
        "cache.from_generation=true",
        "cache.shard_sequences=8",
        "data=completions",
        f"data.source={generated}",
        "data.tokens=generated",
        f"data.seq_len={seq_len}",
        f"data.heldout_fraction={HELDOUT}",
        f"stream.topk={K}",
        *extra,
    ]


@pytest.fixture(scope="module")
def soft_cache(generation, tiny_teacher_dir, tmp_path_factory) -> Path:
    """The generation converted to a float32 cache through the CLI (no Ray, no teacher forward)."""
    generated, seq_len = generation
    cache_dir = tmp_path_factory.mktemp("soft") / "cache"
    overrides = cache_overrides(tiny_teacher_dir, generated, seq_len, cache_dir, "cache.values_dtype=float32")
    proc = run_module("launch.cache", overrides, RAY_ADDRESS="127.0.0.1:9")  # any ray.init would fail
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cache_dir


def packed(generated: Path, seq_len: int, teacher: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """The token rows and target masks a training run packs from the generation."""
    data = OmegaConf.create(
        {
            "source": str(generated),
            "format": "completions",
            "tokens": "generated",
            "seq_len": seq_len,
            "heldout_fraction": HELDOUT,
            "heldout_sequences": 16,
            "max_train_sequences": None,
            "seed": 0,
        }
    )
    prepare_datasets(data, str(teacher), tmp_path, num_ranks=1, global_batch=1)
    arrays = {p.stem: np.load(p, allow_pickle=False) for p in tmp_path.glob("*.npy")}
    train = TrainWindows(tmp_path)
    return {**arrays, "train": train[:], "train_mask": train.target_mask(np.arange(len(train)))}


def test_signals_from_generation_equal_the_live_teachers(generation, soft_cache, tiny_teacher_dir, tmp_path):
    generated, seq_len = generation
    m = json.loads((soft_cache / "manifest.json").read_text())
    assert m["complete"] and m["signals"] == "generation" and m["k"] == K and m["values"] == "float32"
    arrays = packed(generated, seq_len, tiny_teacher_dir, tmp_path)
    tokens, positions = arrays["train"], position_mask(arrays["train_mask"])
    assert (np.diff(arrays["train_mask"].astype(np.int8), axis=1) == -1).sum(1).max() <= 1  # one per row

    teacher = TeacherActor(str(tiny_teacher_dir), dtype="float32", attn_implementation="sdpa")
    reader = CachedTeacher(soft_cache, topk=K)
    batches = [(0, np.arange(r, min(r + 4, len(tokens)))) for r in range(0, len(tokens), 4)]
    counted = 0
    for (_, rows), out in reader.stream(batches, lambda b: tokens[b[1]]):
        live = teacher.topk(0, tokens[rows], K, "float32")
        signal = positions[rows]
        np.testing.assert_array_equal(~np.isnan(out.values[..., 0]), signal)  # filler exactly elsewhere
        np.testing.assert_allclose(out.values[signal], live.values[signal], rtol=0, atol=2e-5)
        np.testing.assert_array_equal(out.indices[signal], live.indices[signal])
        counted += int(signal.sum())
    assert counted == positions.sum() > 500

    # held-out: top-k plus the log-prob of each generated token (the teacher perplexity's input)
    heldout, held_positions = arrays["heldout"], position_mask(arrays["heldout_mask"])
    values, indices, target = reader.heldout(heldout)
    full = torch.from_numpy(teacher.full_log_probs(heldout))
    live_values, live_indices = torch.topk(full, K, dim=-1)
    np.testing.assert_allclose(values[held_positions], live_values.numpy()[held_positions], atol=2e-5)
    np.testing.assert_array_equal(indices[held_positions], live_indices.numpy()[held_positions])
    next_ids = torch.from_numpy(heldout[:, 1:].astype(np.int64)).unsqueeze(-1)
    live_target = full[:, :-1].gather(-1, next_ids).squeeze(-1).numpy()
    counts = held_positions[:, :-1]
    np.testing.assert_allclose(target[counts], live_target[counts], atol=2e-5)
    assert np.isnan(target[~counts]).all()


def test_filler_is_nan_in_every_format():
    """Positions with no signal decode to NaN in every value format; the others as the codec stores them."""
    gen = np.random.default_rng(0)
    values = -np.sort(gen.exponential(2.0, (2, 6, 4)).astype(np.float32), axis=-1)
    values[:, :2] = np.nan  # a prompt
    ids = gen.integers(0, 256, (2, 6, 4)).astype(np.uint16)
    input_ids = np.zeros((2, 6), dtype=np.uint16)
    for fmt in ("float16", "bfloat16", "float32", "int8"):
        tensors = shard(input_ids, values, ids, None, fmt)
        decoded = decode_float32(tensors, fmt).numpy()
        assert np.isnan(decoded[:, :2]).all() and not np.isnan(decoded[:, 2:]).any()
        expected = decode_values(encode_values(np.ascontiguousarray(values[:, 2:]), fmt), fmt)[0]
        if fmt == "bfloat16":
            expected = torch.from_numpy(expected).view(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(decoded[:, 2:], expected)


def test_cached_soft_labels_train_from_the_online_runs_loss(
    generation, soft_cache, attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """teacher=cached data=completions on the converted cache: its first loss and step-0 evaluation are
    the online run's (live teacher on the same batch), and the loss falls."""
    generated, seq_len = generation
    data = ["data=completions", f"data.source={generated}", "data.tokens=generated"]
    data += [f"data.seq_len={seq_len}", f"data.heldout_fraction={HELDOUT}", f"stream.topk={K}"]
    data += ["trainer.micro_batch_size=2"]
    cached = tmp_path / "cached"
    proc = run_train(
        tiny_overrides(
            tiny_teacher_dir,
            tiny_student_dir,
            cached,
            "teacher=cached",
            f"cache.path={soft_cache}",
            *data,
            "trainer.max_steps=12",
            "trainer.eval_every=12",
            "trainer.lr=1e-2",
        )
    )
    assert proc.returncode == 0
    online = tmp_path / "online"
    proc = run_train(
        tiny_overrides(
            tiny_teacher_dir,
            tiny_student_dir,
            online,
            *data,
            "teacher.dtype=float32",
            "stream.values_dtype=float32",
            "trainer.max_steps=1",
            "trainer.eval_every=1",
            *attached_teacher,  # the session's float32 teacher pool
        )
    )
    assert proc.returncode == 0

    def first(run_dir: Path, key: str) -> float:
        return next(r[key] for r in metrics(run_dir) if key in r)

    assert first(cached, "train/loss") == pytest.approx(first(online, "train/loss"), rel=1e-5)
    for key in ("eval/ppl", "eval/teacher_ppl", "eval/top1_agreement"):
        assert first(cached, key) == pytest.approx(first(online, key), rel=1e-5), key
    losses = [r["train/loss"] for r in metrics(cached) if "train/loss" in r]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    evals = [r for r in metrics(cached) if "eval/kl_topk_bucket" in r]
    assert evals[-1]["eval/kl_topk_bucket"] < 0.8 * evals[0]["eval/kl_topk_bucket"]


def test_generations_that_cannot_serve_soft_labels_are_refused(
    generation, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    generated, seq_len = generation

    def convert(source: Path, *extra: str, teacher: Path = tiny_teacher_dir) -> None:
        overrides = cache_overrides(teacher, source, seq_len, tmp_path / "c", *extra)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            write(compose("cache", overrides=overrides))

    with pytest.raises(CacheError, match=rf"stream.topk=9 exceeds the top-{K} the generation stored"):
        convert(generated, "stream.topk=9")
    with pytest.raises(CacheError, match="made by another teacher"):
        convert(generated, teacher=tiny_student_dir)
    with pytest.raises(CacheError, match="needs data=completions"):
        convert(generated, "data=pydoc")

    # re-tokenised text: the tiny teacher's samples are often non-canonical tokenisations of their text
    with pytest.raises(CacheError, match=r"\d+ packed example\(s\) of the .* Set data.tokens=generated"):
        convert(generated, "data.tokens=text")

    # a generation without stored top-k
    plain = tmp_path / "plain"
    shutil.copytree(generated, plain)
    meta = json.loads((plain / "generation.json").read_text())
    (plain / "generation.json").write_text(json.dumps({**meta, "store": "none", "topk": None}))
    with pytest.raises(CacheError, match="store=none, so it holds no teacher top-k"):
        convert(plain)
    assert not (tmp_path / "c" / "train-000000000.safetensors").exists()


def test_generated_ids_are_packed_as_they_are_for_the_generators_tokenizer_only(generation, tmp_path):
    """data.tokens=generated: the completion targets are exactly the sampled ids (stop token included),
    and a student tokenizer that encodes the prompts otherwise is refused before any model loads."""
    generated, _ = generation
    teacher_tokenizer = load_tokenizer(json.loads((generated / "generation.json").read_text())["teacher"])
    rows = load_completions(str(generated), generated_ids=True)
    tokens, targets = pack_examples(rows, teacher_tokenizer, 256, generated_ids=True)
    assert tokens.tokens[targets].tolist() == [t for r in rows for t in r["completion_ids"]]
    text_tokens, _ = pack_examples(rows, teacher_tokenizer, 256)
    assert not np.array_equal(text_tokens.tokens, tokens.tokens)  # sampled ids != re-tokenised text

    other = tiny_tokenizer(tmp_path / "tok", vocab_size=256, corpus=[" ".join(map(str, range(20000)))] * 4)
    with pytest.raises(DataError, match=r"data.tokens=generated: the student's tokenizer encodes the prompt"):
        pack_examples(rows, AutoTokenizer.from_pretrained(other), 256, generated_ids=True)
