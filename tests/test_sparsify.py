"""Sampled teacher signals (distill/teacher/sparsify.py): the KD loss and its gradient against float64
full-vocabulary references, unbiased in expectation and exact when every token is drawn; seeded draws;
the loss's masks and reduction contract; the real teacher actors; refusals before compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_online import exported_weights, metrics, run_train, tiny_overrides
from test_validation import check  # noqa: F401  (a fixture)

from distill.cache import CachedTeacher
from distill.cache.manifest import CacheError, check_run, read_manifest
from distill.cache.writer import CacheWriter, fill
from distill.config import ConfigError
from distill.data import PackedDataset
from distill.losses import DistillationLoss
from distill.stream import TeacherStream
from distill.teacher.actor import TeacherActor
from distill.teacher.sparsify import Sparsifier, request_generator, sparsify

V, ROWS = 40, 5


def reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher log-probs, student logits, the exact forward KL per row and d(mean KL)/d(logits), float64."""
    gen = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(ROWS, V, generator=gen, dtype=torch.float64) * 2.5, -1)
    z = torch.randn(ROWS, V, generator=gen, dtype=torch.float64)
    log_q = torch.log_softmax(z, -1)
    return log_p, z, (log_p.exp() * (log_p - log_q)).sum(-1), (log_q.exp() - log_p.exp()) / ROWS


def sampled_loss(log_p, z, kind: str, k: int, samples: int, seed: int, fused: bool = False, draws: int = 1):
    """`draws` independent draws of the sparsifier over the rows, as one batch [draws, rows]: (the loss,
    i.e. the sum over draws of the mean-over-rows sampled forward KL + offset; its gradient w.r.t. each
    draw's logits [draws, rows, V]; the kd metric, likewise summed)."""
    generator = torch.Generator().manual_seed(seed)
    values, ids, offset = sparsify(log_p.float().repeat(draws, 1), kind, k, samples, generator)
    values, ids = values.view(draws, ROWS, -1), ids.view(draws, ROWS, -1)
    offset = None if offset is None else offset.view(draws, ROWS)  # top-k: no offset
    loss = DistillationLoss("forward_kl", chunk_size=64)
    logits = z.repeat(draws, 1, 1).requires_grad_(True)
    if fused:  # logits = hidden @ I: the chunked path on the same numbers
        eye = torch.eye(V, dtype=z.dtype)
        out = loss.fused(logits, eye, values, ids, None, None, float(ROWS), teacher_offset=offset)
    else:
        out = loss(logits, values, ids, None, None, float(ROWS), teacher_offset=offset)
    out.loss.backward()
    return out.loss.item(), logits.grad, out.metrics["kd_sum"] / ROWS


@pytest.mark.parametrize("kind, k, samples", [("sample", 0, 6), ("topk_sample", 4, 4)])
def test_sampled_kd_is_unbiased_in_expectation(kind, k, samples):
    """2,000 seeded draws: the mean loss value (+ offset) within 4 standard errors (from 40 batches of 50
    draws) of the exact full-vocabulary KL; the gradient's error against q - p in standard errors of the
    draws' own variance (its noise is -p^/rows: multinomial frequencies, none on the head): mean square
    about 1 over all entries, and every entry drawn often enough to be near-normal (>= 20 expected draws)
    within 5; top-k at the same width is off by far more (its bias, which the sampled schemes remove)."""
    log_p, z, kl, grad = reference()
    runs = [sampled_loss(log_p, z, kind, k, samples, seed, draws=50) for seed in range(40)]
    values = np.array([r[0] for r in runs]) / 50  # each batch's mean over its draws
    grads = torch.cat([r[1] for r in runs])
    draws = len(grads)
    error = abs(values.mean() - kl.mean().item())
    assert error < 4 * values.std() / np.sqrt(len(values))
    assert np.allclose([r[2] / 50 for r in runs], values)  # the kd metric carries the offset too
    p = log_p.exp()
    head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, True)
    tail_mass = p.masked_fill(head, 0).sum(-1, keepdim=True)
    share = p / tail_mass  # each tail token's share of the tail the draws come from
    variance = torch.where(head, 0.0, tail_mass**2 * share * (1 - share) / samples)
    grad_error = (grads.mean(0) - grad).abs()
    noisy = ~head
    z_scores = grad_error[noisy] / ((variance / draws).sqrt() / ROWS)[noisy]
    assert (z_scores**2).mean() < 2.0
    assert (z_scores[(tail_mass * share * samples * draws)[noisy] >= 20] < 5).all()
    assert (grad_error[head] < 1e-7).all()  # float32 teacher values

    topk_value, topk_grad, _ = sampled_loss(log_p, z, "topk", k + samples, 0, 0)
    assert abs(topk_value - kl.mean().item()) > 10 * error
    assert (topk_grad[0] - grad).abs().max() > 3 * grad_error.max()


def test_exact_when_every_token_is_drawn():
    """Top V-1 plus one draw from a one-token tail: the sample is that token with its exact mass, so the
    loss and its gradient equal the float64 full-vocabulary KL and q - p (both paths, any seed)."""
    log_p, z, kl, grad = reference()
    for seed in (0, 1):
        for fused in (False, True):
            value, g, _ = sampled_loss(log_p, z, "topk_sample", V - 1, 1, seed, fused=fused)
            assert value == pytest.approx(kl.mean().item(), rel=1e-6)
            torch.testing.assert_close(g[0], grad, rtol=1e-5, atol=1e-7)


def test_masks_and_the_reduction_contract_hold_with_offsets():
    """Masked positions contribute nothing (offset included) and splitting a batch in two with the global
    normaliser sums to the whole batch's loss and gradient."""
    log_p, z, _, _ = reference()
    values, ids, offset = sparsify(log_p.float(), "sample", 0, 6, torch.Generator().manual_seed(3))
    loss = DistillationLoss("forward_kl")
    mask = torch.tensor([True, False, True, True, False])
    whole_z = z.clone().requires_grad_(True)
    whole = loss(whole_z[None], values[None], ids[None], None, mask[None], 3.0, teacher_offset=offset[None])
    whole.loss.backward()
    kept_z = z[mask].clone().requires_grad_(True)
    kept = loss(kept_z[None], values[mask][None], ids[mask][None], None, None, 3.0,
                teacher_offset=offset[mask][None])  # fmt: skip
    kept.loss.backward()
    assert whole.loss.item() == pytest.approx(kept.loss.item(), rel=1e-12)
    assert (whole_z.grad[~mask] == 0).all()
    halves = []
    for rows in ([0, 1], [2, 3, 4]):
        part_z = z[rows].clone().requires_grad_(True)
        out = loss(part_z[None], values[rows][None], ids[rows][None], None, mask[rows][None], 3.0,
                   teacher_offset=offset[rows][None])  # fmt: skip
        out.loss.backward()
        halves.append((out.loss.item(), part_z.grad))
    assert halves[0][0] + halves[1][0] == pytest.approx(whole.loss.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), whole_z.grad)


def test_draws_are_seeded_by_the_window_and_the_run(tiny_teacher_dir):
    """The in-process teacher answers the same window with the same draws every time (a restarted replica,
    a resumed run), other seeds or windows with others; rows hold distinct ids, sorted values, and the
    drawn entries' masses plus the head's sum to 1."""
    teacher = TeacherActor(str(tiny_teacher_dir), dtype="float32", attn_implementation="sdpa")
    ids = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.uint16)
    spec = Sparsifier("topk_sample", 8, seed=5)
    first, again = (teacher.topk(0, ids, 4, "float32", sparsifier=spec) for _ in range(2))
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.values, again.values)
    np.testing.assert_array_equal(first.offset, again.offset)
    other = teacher.topk(0, ids, 4, "float32", sparsifier=Sparsifier("topk_sample", 8, seed=6))
    assert not np.array_equal(other.indices, first.indices)
    assert first.values.shape == (2, 16, 12) and first.offset.shape == (2, 16)
    assert all(len(set(row)) == 12 for row in first.indices.reshape(-1, 12))
    np.testing.assert_array_equal(first.values, -np.sort(-first.values, axis=-1))  # -inf: free slots
    np.testing.assert_allclose(np.exp(first.values.astype(np.float64)).sum(-1), 1.0, rtol=1e-5)
    g1, g2 = (request_generator(ids, 5, torch.device("cpu")) for _ in range(2))
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_sampled_replies_through_the_teacher_pool(tiny_teacher_pool):
    """Real Ray replicas: width `samples`, offsets carried to the stream and counted in its bytes."""
    tokens = np.random.default_rng(1).integers(0, 256, (4, 16)).astype(np.uint16)
    stream = TeacherStream(tiny_teacher_pool.actors, 16, 2, "float16", 60, sparsifier=Sparsifier("sample", 6))
    outs = [out for _, out in stream.stream([(0, np.arange(4))], lambda b: tokens[b[1]])]
    assert outs[0].values.shape == (4, 16, 6) and outs[0].offset.shape == (4, 16)
    assert stream.stats.bytes == 4 * 16 * (6 * 4 + 4)  # fp16 values, uint16 ids, fp32 offset


def test_what_a_sampled_teacher_cannot_serve_is_refused(check):  # noqa: F811
    with pytest.raises(ConfigError, match="unbiased estimate of forward KL at temperature 1 only"):
        check("stream.sparsifier=sample", "stream.samples=12", "loss=reverse_kl")
    with pytest.raises(ConfigError, match="unbiased estimate of forward KL"):
        check("stream.sparsifier=topk_sample", "stream.samples=12", "loss.temperature=2")
    with pytest.raises(ConfigError, match="stream.samples=4 is only read by"):
        check("stream.samples=4")
    with pytest.raises(ConfigError, match="stream.samples=0 must be >= 1"):
        check("stream.sparsifier=sample")


def test_a_cache_of_sampled_signals_replays_the_live_draws(tiny_teacher_pool, tiny_teacher_dir, tmp_path):
    """The writer over real replicas stores the draws and offsets; the reader hands back exactly what the
    live stream gives for the same windows (same seed: same draws), whole rows (no top-k cut), and a run
    asking for another scheme is refused."""
    rng = np.random.default_rng(2)
    data = {"heldout": rng.integers(0, 256, (1, 16), dtype=np.uint16)}
    data["train"] = rng.integers(0, 256, (4, 16), dtype=np.uint16)
    scheme = {"kind": "topk_sample", "samples": 5, "seed": 3}
    identity = {
        "format": "distill-teacher-cache/1",
        "seq_len": 16,
        "k": 4,
        "values": "float32",
        "index_dtype": "uint16",
        "vocab_size": 256,
        "hidden": None,
        "sparsifier": scheme,
        "data": {"train": {"rows": 4, "sha256": PackedDataset(data["train"]).digest()}},
    }
    writer = CacheWriter(tmp_path / "c", identity, {}, tiny_teacher_dir)
    spec = Sparsifier("topk_sample", 5, seed=3)
    live = TeacherStream(tiny_teacher_pool.actors, 4, 2, "float32", 60, sparsifier=spec)

    class Count:
        def update(self, tokens):
            pass

    fill(writer, live, data, shard_sequences=2, batch_size=2, progress=Count())
    writer.finish()
    batches = [(0, np.array([0, 1])), (1, np.array([2, 3]))]
    cached = CachedTeacher(tmp_path / "c", topk=4).stream(batches, lambda b: data["train"][b[1]])
    for (_, a), (_, b) in zip(cached, live.stream(batches, lambda b: data["train"][b[1]])):
        assert a.values.shape == (2, 16, 9)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.offset, b.offset)
    manifest = read_manifest(tmp_path / "c")
    fits = dict(tokenizer=manifest.get("tokenizer"), seq_len=16, train_digest="", heldout_rows=[])
    with pytest.raises(CacheError, match="cache sparsifier mismatch"):
        check_run({**manifest, "tokenizer": None}, tmp_path / "c", topk=4, hidden_layers=None, **fits)


def test_an_online_run_with_sampled_coded_signals(
    attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """`python -m launch.train` with stream.sparsifier=topk_sample and stream.codec=hybrid on the real
    teacher actors and DeepSpeed ranks (offsets through the engine into the loss): every step's loss is
    finite, the stream counts packed bytes, the export is written."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_teacher_dir,
        tiny_student_dir,
        run_dir,
        "trainer.max_steps=3",
        "trainer.eval_every=100",
        "stream.topk=4",
        "stream.sparsifier=topk_sample",
        "stream.samples=8",
        "stream.codec=hybrid",
        "teacher.dtype=float32",
        *attached_teacher,
    )
    assert run_train(overrides).returncode == 0
    steps = [r for r in metrics(run_dir) if "train/loss" in r]
    assert len(steps) == 3 and all(np.isfinite(r["train/loss"]) for r in steps)
    assert 0 < steps[-1]["stream/bytes_per_token"] < 12 * 4 + 4  # packed: under fp16 values + uint16 ids
    assert set(exported_weights(run_dir)) and (run_dir / "student" / "config.json").is_file()
