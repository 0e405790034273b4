"""Several teachers: per-token ensembles on sparse top-k, routing rows by data source, config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_online import run_train, tiny_overrides
from test_validation import compose_cfg

from distill.config import ConfigError
from distill.data import TrainWindows
from distill.data.shards import dataset_windows
from distill.stream import TeacherStream
from distill.stream.ensemble import mix_full_log_probs, mix_topk
from distill.stream.routing import EnsembleStream, RoutedTeacherStream
from distill.teacher import TeacherPool
from launch.train import prepare


def reference_mixture(log_probs: list[np.ndarray], k: int, weights, weighting: str):
    """float64, dense: each teacher's distribution truncated to its own top-k (the rest is its tail),
    mixed with per-token weights, then the k largest entries and the tail 1 - their sum."""
    n = len(log_probs)
    p = [np.exp(lp.astype(np.float64)) for lp in log_probs]
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    w = np.broadcast_to((w / w.sum())[:, None], (n, p[0].shape[0])).copy()
    if weighting == "confidence":
        w = w * np.stack([pi.max(-1) for pi in p])
        w = w / w.sum(0, keepdims=True)
    mix = np.zeros_like(p[0])
    for i, pi in enumerate(p):
        top = np.argsort(-pi, axis=-1)[:, :k]
        truncated = np.zeros_like(pi)
        np.put_along_axis(truncated, top, np.take_along_axis(pi, top, -1), -1)
        mix += w[i][:, None] * truncated
    top = np.argsort(-mix, axis=-1)[:, :k]
    return top, np.take_along_axis(mix, top, -1)


@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ensemble_equals_float64_reference(weighting, dtype):
    rng = np.random.default_rng(0)
    vocab, tokens, k = 40, 64, 6
    shared = rng.normal(size=(tokens, vocab)) * 2  # correlated teachers: their top-k ids overlap a lot
    logits = [shared + rng.normal(size=(tokens, vocab)) * s for s in (0.5, 1.0, 2.0)]
    log_probs = [torch.log_softmax(torch.tensor(x), -1).numpy() for x in logits]
    weights = [0.5, 0.3, 0.2]
    values, indices = [], []
    for lp in log_probs:
        v, ix = torch.tensor(lp, dtype=dtype).topk(k, dim=-1)
        values.append(v)
        indices.append(ix)
    mixed, ids = mix_topk(values, indices, k, weights, weighting)
    ref_ids, ref_mass = reference_mixture(log_probs, k, weights, weighting)

    assert ids.shape == (tokens, k) and mixed.dtype == dtype
    ids, mass = ids.numpy(), mixed.double().exp().numpy()
    assert (np.sort(ids, -1)[:, 1:] != np.sort(ids, -1)[:, :-1]).all()  # distinct ids per token
    order, ref_order = np.argsort(ids, -1), np.argsort(ref_ids, -1)
    np.testing.assert_array_equal(
        np.take_along_axis(ids, order, -1), np.take_along_axis(ref_ids, ref_order, -1)
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(
        np.take_along_axis(mass, order, -1), np.take_along_axis(ref_mass, ref_order, -1), rtol=tol, atol=tol
    )
    # the tail the loss's bucket will see: the teachers' own tails plus the union ids that were cut
    assert (1 - mass.sum(-1) > 0).all()
    overlap = sum(len(set(a) & set(b)) for a, b in zip(indices[0].numpy(), indices[1].numpy()))
    assert overlap > tokens  # the test really exercised ids shared between teachers

    # the dense mixture used for evaluation: log Σ w_i p_i with the same weights
    dense = np.exp(mix_full_log_probs(log_probs, weights, weighting).astype(np.float64))
    p = np.stack([np.exp(lp.astype(np.float64)) for lp in log_probs])
    w = np.asarray(weights)[:, None] / sum(weights) * np.ones((1, tokens))
    if weighting == "confidence":
        w = w * p.max(-1)
        w = w / w.sum(0, keepdims=True)
    np.testing.assert_allclose(dense, (w[..., None] * p).sum(0), rtol=1e-5)


@pytest.fixture(scope="module")
def two_pools(ray_runtime, tiny_teacher_dir: Path, tiny_student_dir: Path):
    """Two different 'teachers' (the tiny teacher and the tiny student model) as real Ray actors."""
    pools = {
        name: TeacherPool.start(f"routing-{name}", str(d), 1, "float32", "sdpa", 1, 0.5, 0)
        for name, d in (("a", tiny_teacher_dir), ("b", tiny_student_dir))
    }
    yield pools
    for pool in pools.values():
        pool.shutdown()


def _stream(pool: TeacherPool, prefetch: int = 2) -> TeacherStream:
    return TeacherStream(pool.actors, 8, prefetch, "float32", 60)


def test_routing_sends_every_row_to_its_sources_teacher(two_pools):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, size=(40, 16)).astype(np.uint16)
    source = rng.integers(0, 3, size=40).astype(np.uint8)  # sources 0 and 2 -> teacher a, 1 -> b
    batches = [np.arange(i, i + 5) for i in range(0, 40, 5)]  # micro-batches mixing sources
    routed = RoutedTeacherStream(
        {"a": _stream(two_pools["a"]), "b": _stream(two_pools["b"])},
        ["a", "b", "a"],
        lambda rows: source[rows],
    )
    replies = list(routed.stream(batches, lambda rows: tokens[rows]))

    assert [b.tolist() for b, _ in replies] == [b.tolist() for b in batches]  # order kept
    assert routed.rows_per_target == {"a": int((source != 1).sum()), "b": int((source == 1).sum())}
    assert routed.stats.requests == sum(len({int(s != 1) for s in source[b]}) for b in batches)
    own = {name: _stream(pool) for name, pool in two_pools.items()}
    for rows, out in replies:
        for name, mask in (("a", source[rows] != 1), ("b", source[rows] == 1)):
            if mask.any():
                ((_, expected),) = own[name].stream([rows[mask]], lambda r: tokens[r])
                np.testing.assert_array_equal(out.values[mask], expected.values)
                np.testing.assert_array_equal(out.indices[mask], expected.indices)


def test_ensemble_stream_mixes_its_members_replies(two_pools):
    tokens = np.random.default_rng(2).integers(0, 256, size=(6, 16)).astype(np.uint16)
    batches = [np.arange(0, 3), np.arange(3, 6)]
    ensemble = EnsembleStream([_stream(two_pools["a"]), _stream(two_pools["b"])], [0.7, 0.3], "confidence")
    got = list(ensemble.stream(batches, lambda rows: tokens[rows]))
    for rows, out in got:
        members = [next(iter(_stream(p).stream([rows], lambda r: tokens[r])))[1] for p in two_pools.values()]
        values, ids = mix_topk(
            [torch.from_numpy(m.values.copy()) for m in members],
            [torch.from_numpy(m.indices.astype(np.int64)) for m in members],
            8,
            [0.7, 0.3],
            "confidence",
        )
        np.testing.assert_array_equal(out.indices, ids.numpy())
        np.testing.assert_allclose(out.values, values.numpy(), rtol=1e-6)


def two_teachers(a: Path, b: Path) -> str:
    """The override that names teachers `a` and `b` (their model folders)."""
    return f"+teachers={{a:{{model:{{name_or_path:{a}}}}},b:{{model:{{name_or_path:{b}}}}}}}"


SOURCES = "data.sources=[{name:python,source:pydoc_topics},{name:licenses,source:common_licenses}]"


def test_routing_config_errors_name_the_key(tiny_teacher_dir, tiny_student_dir, tmp_path):
    a, b = (f"{{model:{{name_or_path:{d}}}}}" for d in (tiny_teacher_dir, tiny_student_dir))
    teachers = f"+teachers={{a:{a},b:{b}}}"
    cases = [
        ([teachers, "+routing={python:a,licenses:b}"], "routing by source needs data.sources"),
        ([SOURCES, teachers, "+routing={python:a}"], "maps no teacher to data source"),
        ([SOURCES, teachers, "+routing={python:a,licenses:c}"], "neither a teacher nor an ensemble"),
        ([SOURCES, teachers, "+routing={python:a,licenses:e}", "+ensembles={e:{members:[a]}}"], "at least 2"),
        (
            [
                SOURCES,
                f"+teachers={{a:{{model:{{name_or_path:{tiny_teacher_dir}}},bogus:1}}}}",
                "+routing={python:a,licenses:a}",
            ],
            "teachers.a",
        ),
        (
            [SOURCES, teachers, "+routing={python:a,licenses:b}", "data.train_sources=[docs]"],
            "data.train_sources",
        ),
    ]
    for overrides, message in cases:
        cfg = compose_cfg(tiny_teacher_dir, tiny_student_dir, *overrides)
        with pytest.raises(ConfigError, match=message):
            prepare(cfg, tmp_path / "run")


def test_sources_are_packed_and_tagged_per_source(tiny_teacher_dir, tiny_student_dir, tmp_path):
    cfg = compose_cfg(
        tiny_teacher_dir,
        tiny_student_dir,
        SOURCES,
        "data.sources.1.max_train_sequences=100",
        "trainer.num_ranks=2",
    )
    prepare(cfg, tmp_path / "run")
    data = tmp_path / "run" / "data"
    train = TrainWindows(data)
    train_source = train.source_index(np.arange(len(train)))
    heldout_source = np.load(data / "heldout_source.npy")
    assert train.sizes[1] == 100 and (train_source == 1).sum() == 100 and (train_source == 0).sum() > 100
    for source in (0, 1):  # every window comes from its own source's shards
        rows = np.flatnonzero(train_source == source)[:5]
        own = dataset_windows(Path(train.spec["sources"][source]["path"]), "train", train.seq_len)
        assert (train[rows] == own.read(rows - train.offsets[source])).all()
    assert (heldout_source == 0).sum() == 4 and (heldout_source == 1).sum() == 4  # every domain evaluated


def test_teachers_that_do_not_fit_the_ray_cluster_are_refused_before_loading(
    tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """Two teachers at 1 CPU each on a 1-CPU Ray: Ray would leave the second pending forever."""
    run_dir = tmp_path / "run"
    routed = [SOURCES, two_teachers(tiny_teacher_dir, tiny_student_dir), "+routing={python:a,licenses:b}"]
    proc = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *routed, "ray.num_cpus=1"),
        timeout=300,
    )
    assert proc.returncode != 0
    assert "the teachers need 2 CPUs (a: 1, b: 1; replicas x cpus_per_replica) but the Ray cluster has 1" in (
        proc.stderr
    )
    assert "teacher pool ready" not in proc.stderr + proc.stdout  # nothing was loaded
