"""The offline teacher cache: written once by `launch.cache`, read by `teacher=cached` training runs.

Checked against the live teacher: cached replies equal its replies bit for bit; a writer killed with
SIGKILL resumes from its last complete shard to the same bytes as an uninterrupted run; a cache that does
not fit the run, or a damaged shard, is refused with the field named; cached training gives the loss
values of online training on the same batches, with no Ray at all, and a sweep reads one cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_online import ROOT, metrics, run_module, run_train, tiny_overrides

from distill.cache import CachedTeacher, CacheError, CacheWriter
from distill.cache.codec import decode_values, encode_values
from distill.cache.manifest import MANIFEST, read_manifest
from distill.cache.writer import fill
from distill.data import PackedDataset
from distill.models import load_tokenizer, tiny_llama, tiny_tokenizer
from distill.stream import TeacherStream
from distill.teacher.actor import TeacherActor, _to_numpy
from launch.train import prepare

SHARD, BATCH = 4, 2  # small shards: many of them, so a kill lands mid-run


def cache_args(teacher: Path, cache_dir: Path, *extra: str) -> list[str]:
    """`launch.cache` over the data of conf/experiment/tiny.yaml (what tiny training runs pack)."""
    return [
        "teacher=local",
        f"teacher.model.name_or_path={teacher}",
        "teacher.dtype=float32",
        f"cache.path={cache_dir}",
        "data.seq_len=32",
        "data.heldout_sequences=8",
        "data.max_train_sequences=512",
        "stream.topk=16",
        f"cache.shard_sequences={SHARD}",
        f"cache.batch_size={BATCH}",
        "ray.num_cpus=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_cache(tiny_teacher_dir, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache") / "tiny"
    proc = run_module("launch.cache", cache_args(tiny_teacher_dir, cache_dir))
    assert proc.returncode == 0
    return cache_dir


def manifest(cache_dir: Path) -> dict:
    return read_manifest(cache_dir)


def cached_rows(cache_dir: Path, split: str = "train") -> np.ndarray:
    """A split's token rows, in row order, as the cache holds them (the arrays a tiny run packs)."""
    rows = manifest(cache_dir)["data"][split]["rows"]
    return CachedTeacher(cache_dir, topk=1)._rows(split, range(rows), ("input_ids",))["input_ids"].numpy()


def test_cached_replies_equal_the_live_teachers_bit_for_bit(tiny_cache, tiny_teacher_dir):
    m = manifest(tiny_cache)
    assert m["complete"] and m["k"] == 16 and m["values"] == "float16" and m["index_dtype"] == "uint16"
    assert len(m["teacher"]["weights_sha256"]) == 64 and len(m["tokenizer"]) == 64
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    teacher = TeacherActor(str(tiny_teacher_dir), dtype="float32", attn_implementation="sdpa")
    tokens = cached_rows(tiny_cache)
    reader = CachedTeacher(tiny_cache, topk=16)
    batches = [(0, np.arange(r, r + BATCH)) for r in range(0, len(tokens), BATCH)]  # as they were written
    for (_, rows), out in reader.stream(batches, lambda b: tokens[b[1]]):
        live = teacher.topk(0, tokens[rows], 16, "float16")
        assert out.values_dtype == "float16"
        np.testing.assert_array_equal(out.values.view(np.uint16), live.values.view(np.uint16))
        np.testing.assert_array_equal(out.indices, live.indices)
    assert reader.stats.tokens == tokens.size

    # held-out: top-k and the teacher's log-prob of each actual next token, found by the sequence's ids
    heldout = cached_rows(tiny_cache, "heldout")
    values, indices, target = reader.heldout(heldout[::-1])
    full = torch.from_numpy(teacher.full_log_probs(heldout[::-1]))
    live_values, live_indices = torch.topk(full, 16, dim=-1)
    np.testing.assert_array_equal(values, live_values.numpy().astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(indices, live_indices.numpy())
    next_ids = torch.from_numpy(heldout[::-1, 1:].astype(np.int64)).unsqueeze(-1)
    np.testing.assert_array_equal(target, full[:, :-1].gather(-1, next_ids).squeeze(-1).numpy())


def test_writer_killed_mid_run_resumes_to_the_same_cache(tiny_cache, tiny_teacher_dir, tmp_path):
    cache_dir = tmp_path / "killed"
    writer = subprocess.Popen(
        [sys.executable, "-m", "launch.cache", *cache_args(tiny_teacher_dir, cache_dir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline, listed = time.monotonic() + 300, []
    while time.monotonic() < deadline and writer.poll() is None:
        try:
            listed = manifest(cache_dir)["shards"]
        except (OSError, ValueError):  # not written yet (it is replaced atomically, never half-written)
            listed = []
        if len(listed) >= 4:
            break
        time.sleep(0.01)
    assert writer.poll() is None, "the writer finished before it could be killed"
    os.killpg(writer.pid, signal.SIGKILL)  # the writer and everything it started (its Ray runtime)
    writer.wait()
    before = manifest(cache_dir)
    total = manifest(tiny_cache)["shards"]
    assert not before["complete"] and 4 <= len(before["shards"]) < len(total)
    written = {s["file"]: (s["sha256"], (cache_dir / s["file"]).stat().st_mtime_ns) for s in before["shards"]}
    with pytest.raises(CacheError, match="incomplete"):
        CachedTeacher(cache_dir, topk=16)

    proc = run_module("launch.cache", cache_args(tiny_teacher_dir, cache_dir))
    assert proc.returncode == 0
    assert f"{len(before['shards'])} of {len(total)} shards already written" in proc.stderr
    after = manifest(cache_dir)
    assert after["complete"] and not list(cache_dir.glob("*.tmp"))
    for s in after["shards"]:  # listed shards were kept as they were; the rest continued after them
        if s["file"] in written:
            assert written[s["file"]] == (s["sha256"], (cache_dir / s["file"]).stat().st_mtime_ns)
    # the same bytes as the uninterrupted cache, shard for shard
    assert [(s["file"], s["sha256"]) for s in after["shards"]] == [(s["file"], s["sha256"]) for s in total]


def test_a_cache_records_whether_the_teacher_kept_documents_apart(
    tiny_cache, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """`launch.cache data.document_isolation=true` starts its teacher keeping packed documents apart, says
    so in the manifest, and holds exactly that teacher's replies (rows with a document boundary inside
    differ from the plain teacher's); a run reads it only with the same setting."""
    cache_dir = tmp_path / "isolated"
    args = cache_args(tiny_teacher_dir, cache_dir, "data.document_isolation=true")
    assert run_module("launch.cache", args).returncode == 0
    assert manifest(cache_dir)["document_isolation"] is True
    assert manifest(tiny_cache).get("document_isolation") is False
    tokens = cached_rows(cache_dir)
    eos = load_tokenizer(tiny_teacher_dir).eos_token_id
    # batches (as written) with a document boundary inside (isolation changes their replies) and one without
    inside = np.flatnonzero((tokens[:, :-1] == eos).any(1)) // BATCH * BATCH
    starts = sorted({0, *inside[:4].tolist()})
    assert len(starts) > 1
    isolated = TeacherActor(str(tiny_teacher_dir), "float32", "sdpa", document_isolation=True)
    plain = TeacherActor(str(tiny_teacher_dir), "float32", "sdpa")
    batches = [(0, np.arange(r, r + BATCH)) for r in starts]
    differs = False
    for (_, rows), out in CachedTeacher(cache_dir, topk=16).stream(batches, lambda b: tokens[b[1]]):
        live = isolated.topk(0, tokens[rows], 16, "float16")
        np.testing.assert_array_equal(out.values.view(np.uint16), live.values.view(np.uint16))
        np.testing.assert_array_equal(out.indices, live.indices)
        differs |= not np.array_equal(out.values, plain.topk(0, tokens[rows], 16, "float16").values)
    assert differs

    def check(*overrides):
        prepare(compose_cached(cache_dir, tiny_student_dir, *overrides), tmp_path / f"run-{time.time_ns()}")

    check("data.document_isolation=true")
    with pytest.raises(CacheError, match=r"document isolation mismatch.*kept packed documents apart"):
        check()


def compose_cached(cache_dir: Path, student: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "+experiment=tiny",
                f"student.model.name_or_path={student}",
                "teacher=cached",
                f"cache.path={cache_dir}",
                *overrides,
            ],
        )


def test_a_cache_that_does_not_fit_the_run_is_refused(tiny_cache, tiny_student_dir, tmp_path):
    def check(*overrides, student=tiny_student_dir, cache=tiny_cache):
        prepare(compose_cached(cache, student, *overrides), tmp_path / f"run-{time.time_ns()}")

    check()  # fits
    check("stream.topk=8")  # a cache of top-16 serves any smaller k: its first 8 entries are the top-8
    with pytest.raises(CacheError, match=r"cache seq_len mismatch.*data.seq_len=32"):
        check("data.seq_len=64")
    with pytest.raises(CacheError, match=r"cache k mismatch.*top-16.*stream.topk=32"):
        check("stream.topk=32")
    with pytest.raises(CacheError, match=r"cache dataset mismatch: the run's train sequences"):
        check("data.max_train_sequences=256")
    check("data.heldout_sequences=4")  # fewer held-out sequences (e.g. more ranks): a subset is fine
    with pytest.raises(CacheError, match=r"cache dataset mismatch: the run's heldout sequences"):
        check("data.heldout_sequences=16")
    with pytest.raises(CacheError, match=r"cache hidden_layers mismatch.*teacher layers \[1\]"):
        check("features.layer_map=0:1")
    with pytest.raises(CacheError, match=r"teacher=cached needs cache.path"):
        check("cache.path=null")
    # written by a teacher that let documents attend to each other: a run that keeps them apart would not
    # see the contexts the teacher scored
    with pytest.raises(CacheError, match=r"document isolation mismatch.*set data.document_isolation=false"):
        check("data.document_isolation=true")

    # a student with another tokenizer (same vocabulary size, other merges)
    other_tok = tiny_tokenizer(
        tmp_path / "tok", vocab_size=256, corpus=[" ".join(map(str, range(20000)))] * 4
    )
    other = tiny_llama(tmp_path / "other", hidden_size=48, num_layers=2, seed=2, tokenizer_dir=other_tok)
    with pytest.raises(CacheError, match=r"cache tokenizer mismatch.*launch.cache"):
        check(student=other)

    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_cache, incomplete)
    m = manifest(incomplete)
    (incomplete / MANIFEST).write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(CacheError, match=r"incomplete .*rerunning the same `python -m launch.cache`"):
        check(cache=incomplete)


def test_a_damaged_shard_is_refused(tiny_cache, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_cache, damaged)
    shard = next(s for s in manifest(damaged)["shards"] if s["split"] == "train" and s["start"] == 8)
    data = bytearray((damaged / shard["file"]).read_bytes())
    data[-5] ^= 0x01  # one bit of one stored value
    (damaged / shard["file"]).write_bytes(bytes(data))
    tokens = cached_rows(tiny_cache)
    reader = CachedTeacher(damaged, topk=16)
    assert reader.verify() == [shard["file"]]  # one rank hashes every shard ...
    shares = [CachedTeacher(damaged, topk=16).verify(rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == [shard["file"]]  # ... or three ranks a third each
    next(reader.stream([(0, np.arange(0, 4))], lambda b: tokens[b[1]]))  # intact shards still serve
    with pytest.raises(CacheError, match="differ from the run's"):  # and ids must match the batch's
        next(reader.stream([(0, np.arange(0, 2))], lambda b: tokens[b[1] + 1]))
    (damaged / shard["file"]).write_bytes(bytes(data[:-1]))  # a truncated shard: refused when opened
    with pytest.raises(CacheError, match=rf"{shard['file']} has \d+ bytes, the manifest \d+"):
        next(CachedTeacher(damaged, topk=16).stream([(0, np.arange(8, 10))], lambda b: tokens[b[1]]))


def test_codecs_round_trip(tiny_teacher_dir):
    """Float formats store exactly what the actor sends; int8 is within half a step of fp32, keeps the
    order, and stores top-1 exactly."""
    teacher = TeacherActor(str(tiny_teacher_dir), dtype="float32", attn_implementation="sdpa")
    ids = np.arange(64, dtype=np.uint16).reshape(2, 32) + 100
    values = teacher.topk(0, ids, 16, "float32").values
    for fmt in ("float16", "bfloat16", "float32"):
        decoded, dtype = decode_values(encode_values(values, fmt), fmt)
        assert dtype == fmt
        np.testing.assert_array_equal(decoded, _to_numpy(torch.from_numpy(values), fmt))
    encoded = encode_values(values, "int8")
    decoded, dtype = decode_values(encoded, "int8")
    step = encoded["step"].numpy()[..., None]
    assert dtype == "float32" and encoded["codes"].dtype == torch.uint8
    assert (np.abs(decoded - values) <= step / 2 + 1e-6).all()
    np.testing.assert_array_equal(decoded[..., 0], values[..., 0])
    assert (np.diff(decoded, axis=-1) <= 0).all()


def test_cached_training_equals_online_training_and_a_sweep_reads_one_cache(
    tiny_cache, attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """Same seed, same batches: the cached run's losses are the online run's (fp16 values identical); a
    Hydra sweep over the loss reads the one cache, with Ray made unreachable to prove no run uses it.
    The online run uses the session's float32 teacher pool (attached_teacher)."""
    steps = ["trainer.max_steps=2", "trainer.eval_every=2"]
    online = tmp_path / "online"
    proc = run_train(
        tiny_overrides(
            tiny_teacher_dir, tiny_student_dir, online, *steps, "teacher.dtype=float32", *attached_teacher
        )
    )
    assert proc.returncode == 0

    sweep = run_module(
        "launch.train",
        [
            "-m",
            "+experiment=tiny",
            f"student.model.name_or_path={tiny_student_dir}",
            "teacher=cached",
            f"cache.path={tiny_cache}",
            "loss=forward_kl,reverse_kl",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *steps,
        ],
        timeout=900,
        RAY_ADDRESS="127.0.0.1:9",  # any ray.init would try (and fail) to join this
    )
    assert sweep.returncode == 0
    assert "held-out KL, top-k + tail bucket" in sweep.stdout

    def losses(run_dir):
        return [(r["step"], r["train/loss"]) for r in metrics(run_dir) if "train/loss" in r]

    cached, reverse = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    assert [s for s, _ in losses(cached)] == [1, 2]
    assert losses(cached) == pytest.approx(losses(online), rel=1e-6, abs=1e-7)
    assert losses(reverse)[0][1] != pytest.approx(losses(cached)[0][1], rel=1e-3)  # the other point's loss

    live_evals = [r for r in metrics(online) if "eval/kl" in r]
    cached_evals = [r for r in metrics(cached) if "eval/kl_topk_bucket" in r]
    assert [r["step"] for r in cached_evals] == [r["step"] for r in live_evals] == [0, 2]
    for live, offline in zip(live_evals, cached_evals):
        for key in ("eval/top1_agreement", "eval/ppl", "eval/teacher_ppl"):
            assert offline[key] == pytest.approx(live[key], rel=1e-6), key
        assert 0 < offline["eval/kl_topk_bucket"] <= live["eval/kl"]  # merging outcomes lowers a KL
    summary = json.loads((cached / "summary.json").read_text())
    assert summary["after"]["kl_topk_bucket"] == cached_evals[-1]["eval/kl_topk_bucket"]


def test_hidden_states_and_int8_through_the_teacher_pool(tiny_teacher_pool, tiny_teacher_dir, tmp_path):
    """The writer over real Ray replicas with hidden states: the reader gives the live hidden states and
    ids exactly, int8 values within half a quantisation step."""
    rng = np.random.default_rng(0)
    data = {
        "heldout": rng.integers(0, 256, (2, 16), dtype=np.uint16),
        "train": rng.integers(0, 256, (10, 16), dtype=np.uint16),
    }
    identity = {
        "format": "distill-teacher-cache/1",
        "seq_len": 16,
        "k": 8,
        "values": "int8",
        "vocab_size": 256,
        "hidden": {"layers": [0, 2], "dtype": "float16"},
        "data": {"train": {"rows": 10, "sha256": PackedDataset(data["train"]).digest()}},
    }
    writer = CacheWriter(tmp_path / "c", identity, {}, tiny_teacher_dir)
    stream = TeacherStream(tiny_teacher_pool.actors, 8, 2, "float32", 60, hidden_layers=[0, 2])

    class Count:
        def update(self, tokens):
            pass

    fill(writer, stream, data, shard_sequences=4, batch_size=3, progress=Count())
    writer.finish()
    reader = CachedTeacher(tmp_path / "c", topk=8, hidden_layers=[2])
    live = TeacherStream(tiny_teacher_pool.actors, 8, 1, "float16", 60, hidden_layers=[2])
    batches = [(0, np.array([0, 1, 2])), (1, np.array([8, 9]))]  # as written: same teacher numerics
    for ((_, rows), cached), (_, out) in zip(
        reader.stream(batches, lambda b: data["train"][b[1]]),
        live.stream(batches, lambda b: data["train"][b[1]]),
    ):
        exact = TeacherStream(tiny_teacher_pool.actors, 8, 1, "float32", 60)
        ((_, fp32),) = exact.stream([(0, rows)], lambda b: data["train"][b[1]])
        np.testing.assert_array_equal(cached.indices, out.indices)
        np.testing.assert_array_equal(cached.hidden, out.hidden)  # float16, as the live stream sends them
        assert cached.hidden_layers == [2]
        span = fp32.values[..., :1] - fp32.values[..., -1:]
        assert (np.abs(cached.values - fp32.values) <= span / 255 / 2 + 1e-6).all()
