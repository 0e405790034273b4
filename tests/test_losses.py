"""Divergences, DistillationLoss (unfused), schedules and feature distillation against float64 references.

The reference below is written independently of distill.losses: plain Python loops over probabilities
(math.log / math.exp), building the k+1 bucket or the renormalised k entries by hand and tempering them as
p^(1/T) / sum p^(1/T).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    DIVERGENCES,
    DistillationLoss,
    FeatureProjector,
    dense_divergence,
    parse_layer_map,
    sparse_divergence,
)

pytestmark = pytest.mark.filterwarnings("ignore:distillation temperature > 1:UserWarning")

TEMPERATURES = (0.5, 1.0, 2.0)
# (kind, beta, alpha): beta only matters for jsd, alpha only for the skews.
CASES = (
    [("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1), ("tv", 0.5, 0.1)]
    + [("jsd", beta, 0.1) for beta in (0.0, 0.3, 1.0)]
    + [(kind, 0.5, alpha) for kind in ("skew_forward_kl", "skew_reverse_kl") for alpha in (0.0, 0.1, 1.0)]
)


# ----------------------------------------------------------------------------- independent reference


def ref_softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def ref_temper(probs: list[float], temperature: float) -> list[float]:
    powered = [p ** (1.0 / temperature) if p > 0 else 0.0 for p in probs]
    total = sum(powered)
    return [p / total for p in powered]


def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def ref_divergence(p: list[float], q: list[float], kind: str, beta: float, alpha: float) -> float:
    if kind == "forward_kl":
        return ref_kl(p, q)
    if kind == "reverse_kl":
        return ref_kl(q, p)
    if kind == "jsd":
        if beta == 0.0:
            return ref_kl(p, q)
        if beta == 1.0:
            return ref_kl(q, p)
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if kind == "skew_forward_kl":
        return ref_kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    if kind == "skew_reverse_kl":
        return ref_kl(q, [(1 - alpha) * x + alpha * y for x, y in zip(p, q)])
    assert kind == "tv"
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


def ref_token(
    student: list[float], teacher: list[float], k: int, tail: str, temperature: float
) -> tuple[list[float], list[float]]:
    """Teacher/student distributions the sparse loss should compare, from full logits of one token."""
    p_full, q_full = ref_softmax(teacher), ref_softmax(student)
    ids = sorted(range(len(teacher)), key=lambda j: -p_full[j])[:k]
    p_ids, q_ids = [p_full[j] for j in ids], [q_full[j] for j in ids]
    if tail == "bucket":
        p = p_ids + [max(0.0, 1.0 - sum(p_ids))]
        q = q_ids + [sum(q_full[j] for j in range(len(student)) if j not in ids)]
    else:
        p = [x / sum(p_ids) for x in p_ids]
        q = [x / sum(q_ids) for x in q_ids]
    return ref_temper(p, temperature), ref_temper(q, temperature)


def make_inputs(seed: int, batch: int = 2, seq: int = 3, vocab: int = 12, k: int = 4):
    """Student/teacher logits (float64) and the teacher's top-k log-probs as the stream sends them."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 2
    values, indices = teacher.log_softmax(-1).topk(k, dim=-1)
    return student, teacher, values, indices


# ----------------------------------------------------------------------------- divergences


def test_cases_cover_every_divergence() -> None:
    assert {kind for kind, _, _ in CASES} == set(DIVERGENCES)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,beta,alpha", CASES)
def test_sparse_matches_reference(
    kind: str, beta: float, alpha: float, tail: str, temperature: float
) -> None:
    student, teacher, values, indices = make_inputs(seed=1)
    got = sparse_divergence(
        student, values, indices, kind, tail=tail, temperature=temperature, beta=beta, alpha=alpha
    )
    flat_s, flat_t = student.reshape(-1, 12).tolist(), teacher.reshape(-1, 12).tolist()
    want = []
    for s, t in zip(flat_s, flat_t):
        p, q = ref_token(s, t, 4, tail, temperature)
        want.append(ref_divergence(p, q, kind, beta, alpha))
    torch.testing.assert_close(
        got.reshape(-1), torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta,alpha", CASES)
def test_dense_matches_reference(kind: str, beta: float, alpha: float, temperature: float) -> None:
    student, teacher, _, _ = make_inputs(seed=2)
    got = dense_divergence(student, teacher, kind, temperature=temperature, beta=beta, alpha=alpha)
    want = [
        ref_divergence(
            ref_softmax([x / temperature for x in t]),
            ref_softmax([x / temperature for x in s]),
            kind,
            beta,
            alpha,
        )
        for s, t in zip(student.reshape(-1, 12).tolist(), teacher.reshape(-1, 12).tolist())
    ]
    torch.testing.assert_close(
        got.reshape(-1), torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,beta,alpha", CASES)
def test_sparse_with_all_ids_equals_dense(
    kind: str, beta: float, alpha: float, tail: str, temperature: float
) -> None:
    student, teacher, values, indices = make_inputs(seed=3, k=12)
    # the stream's ids come in top-k order, not vocabulary order: the result must not care
    sparse = sparse_divergence(
        student, values, indices, kind, tail=tail, temperature=temperature, beta=beta, alpha=alpha
    )
    dense = dense_divergence(student, teacher, kind, temperature=temperature, beta=beta, alpha=alpha)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-13)
    sparse32 = sparse_divergence(
        student.float(),
        values.float(),
        indices,
        kind,
        tail=tail,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
    )
    torch.testing.assert_close(sparse32.double(), dense, rtol=1e-4, atol=1e-5)


def test_jsd_endpoints_are_the_kls_and_interior_is_the_mixture_formula() -> None:
    student, teacher, values, indices = make_inputs(seed=4)
    forward = sparse_divergence(student, values, indices, "forward_kl")
    reverse = sparse_divergence(student, values, indices, "reverse_kl")
    torch.testing.assert_close(sparse_divergence(student, values, indices, "jsd", beta=0.0), forward)
    torch.testing.assert_close(sparse_divergence(student, values, indices, "jsd", beta=1.0), reverse)
    near_zero = sparse_divergence(student, values, indices, "jsd", beta=1e-6)
    assert (near_zero < 1e-3 * forward).all(), "the TRL formula goes to 0 near the endpoint (documented jump)"
    torch.testing.assert_close(
        sparse_divergence(student, values, indices, "skew_forward_kl", alpha=0.0), forward
    )
    torch.testing.assert_close(
        sparse_divergence(student, values, indices, "skew_reverse_kl", alpha=0.0), reverse
    )
    assert sparse_divergence(student, values, indices, "skew_forward_kl", alpha=1.0).abs().max() < 1e-12


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta,alpha", CASES)
def test_bucket_is_nonnegative_and_zero_for_identical_models(
    kind: str, beta: float, alpha: float, temperature: float
) -> None:
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(64, 40, generator=gen) * 3
    teacher = torch.randn(64, 40, generator=gen) * 3
    values, indices = teacher.log_softmax(-1).topk(6, dim=-1)
    opts = {"tail": "bucket", "temperature": temperature, "beta": beta, "alpha": alpha}
    with pytest.warns(UserWarning) if temperature > 1 else _no_warning():
        d = sparse_divergence(student, values, indices, kind, **opts)
        same = sparse_divergence(teacher, values, indices, kind, **opts)
    assert torch.isfinite(d).all() and d.min() >= -1e-6
    assert same.abs().max() < 1e-5, "bucketing and tempering both sides the same way must give 0"


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,beta,alpha", CASES)
def test_degenerate_tokens_stay_finite(kind: str, beta: float, alpha: float, tail: str) -> None:
    """Top-k mass ~1 (or past 1 after fp16 rounding) and a student with ~0 mass on the teacher's ids."""
    vocab, k = 32, 4
    teacher = torch.zeros(4, vocab)
    teacher[:, 0] = 60.0  # teacher top-k mass rounds to 1 in fp32
    values, indices = teacher.log_softmax(-1).topk(k, dim=-1)
    values[1] = torch.tensor([0.6, 0.4001, 1e-8, 1e-9]).log()  # sums past 1
    values = values.half()
    student = torch.zeros(4, vocab)
    student[2:] = student[2:].scatter(-1, indices[2:], -90.0)  # ~0 student mass on the teacher's ids
    student[3] = 0.0
    student[3, indices[3]] = 80.0  # ~0 student mass OUTSIDE the teacher's ids
    student.requires_grad_(True)
    for temperature in (0.5, 1.0):
        d = sparse_divergence(
            student, values, indices, kind, tail=tail, temperature=temperature, beta=beta, alpha=alpha
        )
        assert torch.isfinite(d).all() and (d >= -1e-6).all(), d
        if d.requires_grad:  # skews at alpha=1 are identically 0 and do not depend on the student
            (grad,) = torch.autograd.grad(d.sum(), student)
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("values_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("indices_dtype", [torch.uint16, torch.int32, torch.int64])
def test_wire_dtypes(values_dtype: torch.dtype, indices_dtype: torch.dtype) -> None:
    student, _, values, indices = make_inputs(seed=6, vocab=300, k=16)
    want = sparse_divergence(student.float(), values.float(), indices, "forward_kl")
    got = sparse_divergence(
        student.bfloat16(), values.to(values_dtype), indices.to(indices_dtype), "forward_kl"
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_small_k_with_high_temperature_warns() -> None:
    student, _, values, indices = make_inputs(seed=7)
    with pytest.warns(UserWarning, match="temperature > 1 with only k=4"):
        sparse_divergence(student, values, indices, "forward_kl", temperature=2.0)
    with _no_warning():
        sparse_divergence(student, values, indices, "forward_kl", temperature=1.0)
        sparse_divergence(student, values, indices, "forward_kl", temperature=0.5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, v, i: sparse_divergence(s, v, i, "kl"), "unknown divergence 'kl'"),
        (lambda s, v, i: sparse_divergence(s, v, i, "forward_kl", tail="drop"), "tail treatment 'drop'"),
        (lambda s, v, i: sparse_divergence(s, v, i, "jsd", beta=1.5), "beta must be in"),
        (lambda s, v, i: sparse_divergence(s, v, i, "forward_kl", temperature=0.0), "temperature must be"),
        (lambda s, v, i: sparse_divergence(s, v[..., :2], i, "forward_kl"), "same shape"),
    ],
)
def test_divergence_argument_errors(call, match: str) -> None:
    student, _, values, indices = make_inputs(seed=8)
    with pytest.raises(ValueError, match=match):
        call(student, values, indices)


# ----------------------------------------------------------------------------- DistillationLoss (unfused)


def batch(seed: int, batch_size: int = 3, seq: int = 5, vocab: int = 12, k: int = 4):
    student, teacher, values, indices = make_inputs(seed, batch_size, seq, vocab, k)
    gen = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(0, vocab, (batch_size, seq), generator=gen)
    labels[torch.rand(batch_size, seq, generator=gen) < 0.3] = -100
    mask = torch.rand(batch_size, seq, generator=gen) < 0.7
    return student, teacher, values, indices, labels, mask


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,temperature", [("forward_kl", 2.0), ("jsd", 0.5), ("tv", 1.0)])
def test_loss_matches_reference(kind: str, temperature: float, tail: str) -> None:
    student, teacher, values, indices, labels, mask = batch(seed=10)
    loss_fn = DistillationLoss(
        kind, temperature=temperature, kd_weight=0.7, ce_weight=0.4, tail=tail, beta=0.3
    )
    normaliser = 23.0
    with pytest.warns(UserWarning) if temperature > 1 else _no_warning():
        out = loss_fn(student, values, indices, labels, mask, normaliser)
    total, kd_sum, ce_sum, t_mass, s_mass, top1 = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            s, te = student[b, t].tolist(), teacher[b, t].tolist()
            p, q = ref_token(s, te, 4, tail, temperature)
            d = ref_divergence(p, q, kind, 0.3, 0.1)
            q_full, p_full = ref_softmax(s), ref_softmax(te)
            ce = -math.log(q_full[labels[b, t]]) if labels[b, t] != -100 else 0.0
            total += 0.7 * temperature**2 * d + 0.4 * ce
            kd_sum, ce_sum = kd_sum + d, ce_sum + ce
            ids = indices[b, t].tolist()
            t_mass += sum(p_full[j] for j in ids)
            s_mass += sum(q_full[j] for j in ids)
            top1 += int(max(range(12), key=lambda j: q_full[j]) == ids[0])
    assert out.loss.item() == pytest.approx(total / normaliser, rel=1e-9)
    m = out.metrics
    assert m["kd_sum"] == pytest.approx(kd_sum, rel=1e-9)
    assert m["ce_sum"] == pytest.approx(ce_sum, rel=1e-9)
    assert m["teacher_topk_mass_sum"] == pytest.approx(t_mass, rel=1e-9)
    assert m["student_mass_on_teacher_topk_sum"] == pytest.approx(s_mass, rel=1e-9)
    assert m["top1_match_sum"] == top1
    assert m["tokens"] == int(mask.sum())
    assert m["ce_tokens"] == int((mask & (labels != -100)).sum())


def test_ce_part_equals_torch_cross_entropy() -> None:
    student, _, values, indices, labels, mask = batch(seed=11)
    student.requires_grad_(True)
    out = DistillationLoss(kd_weight=0.0, ce_weight=1.0)(student, values, indices, labels, mask, 7.0)
    targets = torch.where(mask, labels, torch.full_like(labels, -100))
    want = (
        F.cross_entropy(student.reshape(-1, 12), targets.reshape(-1), ignore_index=-100, reduction="sum")
        / 7.0
    )
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    (got_grad,) = torch.autograd.grad(out.loss, student)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got_grad, want_grad)


def test_kd_weight_zero_does_not_move_student_and_loss_always_backpropagates() -> None:
    student, _, values, indices, labels, mask = batch(seed=12)
    student.requires_grad_(True)
    schedule = {"kd_weight": {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 10}}
    loss_fn = DistillationLoss(kd_weight=0.0, ce_weight=0.0, schedule=schedule)
    out = loss_fn(student, values, indices, labels, mask, 5.0, step=0)
    assert out.loss.item() == 0.0 and out.metrics["kd_sum"] > 0
    (grad,) = torch.autograd.grad(out.loss, student)
    assert grad.abs().max() == 0.0


def test_padding_rows_never_enter_the_loss() -> None:
    student, _, values, indices, labels, mask = batch(seed=13)
    loss_fn = DistillationLoss("reverse_kl", ce_weight=1.0)
    clean = loss_fn(student, values, indices, labels, mask, 9.0)
    dirty_values = values.clone()
    dirty_values[~mask] = float("nan")
    dirty_student = student.clone()
    dirty_student[~mask] = float("inf")
    dirty = loss_fn(dirty_student, dirty_values, indices, labels, mask, 9.0)
    assert dirty.loss.item() == clean.loss.item()


def test_schedule_values_at_steps() -> None:
    schedule = {
        "kd_weight": {"kind": "linear", "start": 0.0, "end": 2.0, "steps": 100},
        "temperature": {"kind": "cosine", "start": 2.0, "end": 1.0, "steps": 10},
        "ce_weight": {"kind": "constant", "value": 0.25},
    }
    loss_fn = DistillationLoss(schedule=schedule)
    assert loss_fn.values_at(0) == {"temperature": 2.0, "kd_weight": 0.0, "ce_weight": 0.25}
    assert loss_fn.values_at(25)["kd_weight"] == pytest.approx(0.5)
    assert loss_fn.values_at(5)["temperature"] == pytest.approx(1.5)
    assert loss_fn.values_at(2)["temperature"] == pytest.approx(1.0 + 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert loss_fn.values_at(1000) == {"temperature": 1.0, "kd_weight": 2.0, "ce_weight": 0.25}


def test_schedule_drives_the_loss() -> None:
    student, _, values, indices, labels, mask = batch(seed=14, k=12)
    schedule = {"temperature": {"kind": "linear", "start": 1.0, "end": 3.0, "steps": 4}}
    scheduled = DistillationLoss(ce_weight=0.5, schedule=schedule)(
        student, values, indices, labels, mask, 4.0, 2
    )
    fixed = DistillationLoss(temperature=2.0, ce_weight=0.5)(student, values, indices, labels, mask, 4.0)
    assert scheduled.loss.item() == pytest.approx(fixed.loss.item(), rel=1e-12)


def test_schedule_accepts_omegaconf() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"ce_weight": {"kind": "linear", "start": 1.0, "end": 0.0, "steps": 4}})
    assert DistillationLoss(schedule=cfg).values_at(1)["ce_weight"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"divergence": "kl"}, "divergence 'kl' unknown"),
        ({"tail": "drop"}, "tail 'drop' unknown"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"kd_weight": -1}, "kd_weight must be a finite number >= 0"),
        ({"beta": 2}, r"beta must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"divergence": "skew_forward_kl", "alpha": 1.0}, "identically 0"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"kd_weight": 0, "ce_weight": 0}, "both 0"),
        ({"schedule": {"lr": {}}}, "'lr' is not schedulable"),
        ({"schedule": {"kd_weight": {"kind": "step"}}}, "kind 'step' unknown"),
        ({"schedule": {"kd_weight": {"kind": "linear", "start": 0, "end": 1}}}, "missing"),
        ({"schedule": {"kd_weight": {"kind": "linear", "start": 0, "end": 1, "steps": 0}}}, "steps must be"),
        ({"schedule": {"temperature": {"kind": "constant", "value": 0}}}, "must be > 0"),
        (
            {"schedule": {"kd_weight": {"kind": "linear", "start": 0, "end": 1, "steps": 3, "x": 1}}},
            "unknown keys",
        ),
        ({"schedule": [1]}, "schedule must be a mapping"),
    ],
)
def test_constructor_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillationLoss(**kwargs)


def test_call_validation() -> None:
    student, _, values, indices, labels, mask = batch(seed=15)
    loss_fn = DistillationLoss()
    with pytest.raises(ValueError, match="normaliser must be"):
        loss_fn(student, values, indices, labels, mask, 0)
    with pytest.raises(ValueError, match="student vocabulary has 12"):
        loss_fn(student, values, indices + 12, labels, mask, 1.0)
    with pytest.raises(ValueError, match="mask"):
        loss_fn(student, values, indices, labels, mask[:, :2], 1.0)


# ----------------------------------------------------------------------------- feature distillation


def test_parse_layer_map() -> None:
    assert parse_layer_map("2i+1", num_student_layers=3) == {0: 1, 1: 3, 2: 5}
    assert parse_layer_map("2 * i - 0", num_student_layers=2) == {0: 0, 1: 2}
    assert parse_layer_map("i", num_student_layers=2, num_teacher_layers=2) == {0: 0, 1: 1}
    assert parse_layer_map("0:1, 2:5") == {0: 1, 2: 5}
    assert parse_layer_map({"1": 3, 0: "1"}) == {0: 1, 1: 3}
    assert parse_layer_map([1, 3]) == {0: 1, 1: 3}
    with pytest.raises(ValueError, match="needs num_student_layers"):
        parse_layer_map("2i+1")
    with pytest.raises(ValueError, match="teacher has 5 layers"):
        parse_layer_map("2i+1", num_student_layers=3, num_teacher_layers=5)
    with pytest.raises(ValueError, match="not understood"):
        parse_layer_map("every other")
    with pytest.raises(ValueError, match="layer index"):
        parse_layer_map({0: -1})


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_matches_reference_and_trains_the_projection(kind: str) -> None:
    torch.manual_seed(0)
    layer_map = {0: 1, 2: 5}
    projector = FeatureProjector(layer_map, student_width=3, teacher_width=4, loss=kind, weight=0.5).double()
    student = {i: torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True) for i in range(3)}
    teacher = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(6)]
    mask = torch.tensor([[True, False, True], [True, True, False]])
    out = projector(student, teacher, mask, normaliser=6.0)

    want = 0.0
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                continue
            per_layer = []
            for s_layer, t_layer in layer_map.items():
                lin = projector.proj[str(s_layer)]
                x, y = student[s_layer][b, t].tolist(), teacher[t_layer][b, t].tolist()
                proj = [
                    sum(w * xi for w, xi in zip(row, x)) + bias
                    for row, bias in zip(lin.weight.tolist(), lin.bias.tolist())
                ]
                if kind == "mse":
                    per_layer.append(sum((a - c) ** 2 for a, c in zip(proj, y)) / 4)
                else:
                    dot = sum(a * c for a, c in zip(proj, y))
                    norms = math.sqrt(sum(a * a for a in proj)) * math.sqrt(sum(c * c for c in y))
                    per_layer.append(1 - dot / norms)
            want += sum(per_layer) / len(per_layer)
    assert out.loss.item() == pytest.approx(0.5 * want / 6.0, rel=1e-9)
    assert out.metrics["feature_sum"] == pytest.approx(want, rel=1e-9)
    assert out.metrics["tokens"] == 4
    out.loss.backward()
    for s_layer in layer_map:
        assert projector.proj[str(s_layer)].weight.grad.abs().sum() > 0
        assert student[s_layer].grad.abs().sum() > 0
    assert student[1].grad is None, "unmapped layers take no part"


def test_feature_projector_equal_widths_starts_at_identity_and_validates() -> None:
    projector = FeatureProjector("0:0", student_width=4, teacher_width=4)
    hidden = [torch.randn(1, 3, 4)]
    assert projector(hidden, hidden, None, 3).loss.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="widths 4->4 do not match"):
        FeatureProjector({0: 0}, 4, 5)(hidden, hidden, None, 3)
    with pytest.raises(ValueError, match="feature loss 'l1'"):
        FeatureProjector({0: 0}, 4, 4, loss="l1")
