"""The fused chunked lm_head + loss path: gradcheck, equality with the unfused loss, reduction invariance."""

from __future__ import annotations

import pytest
import torch

from distill.losses import DIVERGENCES, DistillationLoss

pytestmark = pytest.mark.filterwarnings("ignore:distillation temperature > 1:UserWarning")


def problem(seed: int, batch: int = 2, seq: int = 5, width: int = 6, vocab: int = 11, k: int = 4):
    """float64 hidden states, lm_head weight, teacher top-k, labels with -100 and a random mask."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, width, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 2
    values, indices = teacher.log_softmax(-1).topk(k, dim=-1)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < 0.3] = -100
    mask = torch.rand(batch, seq, generator=gen) < 0.75
    mask[0, 0] = True
    return hidden, weight, values, indices.to(torch.int32), labels, mask


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_fused_gradcheck(kind: str, tail: str) -> None:
    hidden, weight, values, indices, labels, mask = problem(seed=0, seq=4, width=3, vocab=7, k=3)
    loss_fn = DistillationLoss(kind, temperature=2.0, ce_weight=0.3, tail=tail, beta=0.3, chunk_size=2)

    def loss(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return loss_fn.fused(h, w, values, indices, labels, mask, normaliser=5.0).loss

    # full Jacobian for the two KL bases, the (cheaper, still numerical) random-projection check elsewhere
    fast = kind not in ("forward_kl", "jsd")
    assert torch.autograd.gradcheck(loss, (hidden, weight), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


def test_fused_gradcheck_frozen_head() -> None:
    hidden, weight, values, indices, labels, mask = problem(seed=1, seq=4, width=3, vocab=7, k=3)
    weight = weight.detach()
    loss_fn = DistillationLoss("reverse_kl", chunk_size=3)

    def loss(h: torch.Tensor) -> torch.Tensor:
        return loss_fn.fused(h, weight, values, indices, labels, mask, normaliser=3.0).loss

    assert torch.autograd.gradcheck(loss, (hidden,), eps=1e-6, atol=1e-7, rtol=1e-5)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 1024])
@pytest.mark.parametrize(
    "kind,tail,temperature",
    [("forward_kl", "bucket", 1.0), ("jsd", "renormalize", 2.0), ("skew_reverse_kl", "bucket", 0.5)],
)
def test_fused_equals_unfused(kind: str, tail: str, temperature: float, chunk_size: int) -> None:
    hidden, weight, values, indices, labels, mask = problem(seed=2, batch=3, seq=4)
    assert int(mask.sum()) % 3 and int(mask.sum()) % 4 and int(mask.sum()) % 7  # chunks do not divide tokens
    loss_fn = DistillationLoss(kind, temperature=temperature, ce_weight=0.5, tail=tail, chunk_size=chunk_size)
    plain = loss_fn(hidden @ weight.T, values, indices, labels, mask, normaliser=17.0)
    fused = loss_fn.fused(hidden, weight, values, indices, labels, mask, normaliser=17.0)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads(fused.loss, hidden, weight), grads(plain.loss, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert fused.metrics == pytest.approx(plain.metrics, rel=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_degenerate_tokens(kind: str) -> None:
    """Confident student (tail ~1e-31 and ~1e-52) and a teacher whose top-k mass is ~1, fp64 and fp32."""
    hidden, weight, values, indices, labels, mask = problem(seed=8, batch=1, seq=4, width=5, vocab=9, k=3)
    with torch.no_grad():
        weight[:, :2] = 0.0
        weight[indices[0, 1].long(), 0] = 1.0
        weight[indices[0, 2].long(), 1] = 1.0
        hidden[0, :, :2] = 0.0
        hidden[0, 1, 0] = 80.0  # the student puts ~all its mass on the teacher's ids at token 1 (tail ~1e-35)
        hidden[0, 2, 1] = 120.0  # ... and even more at token 2 (tail ~1e-52, below fp32's normal range)
    values[0, 3] = torch.tensor([-1e-12, -30.0, -31.0], dtype=values.dtype)  # top-k mass ~1
    mask = torch.ones_like(mask)
    loss_fn = DistillationLoss(kind, ce_weight=0.2, chunk_size=3)
    plain = loss_fn(hidden @ weight.T, values, indices, labels, mask, 4.0)
    fused = loss_fn.fused(hidden, weight, values, indices, labels, mask, 4.0)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads(fused.loss, hidden, weight), grads(plain.loss, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    h32 = hidden.detach().float().requires_grad_(True)
    w32 = weight.detach().float().requires_grad_(True)
    out32 = loss_fn.fused(h32, w32, values.float(), indices, labels, mask, 4.0)
    g_h, g_w = grads(out32.loss, h32, w32)
    assert torch.isfinite(out32.loss) and torch.isfinite(g_h).all() and torch.isfinite(g_w).all()
    # In fp32 the fused path resolves a student tail down to ~1e-38 of the top logit's mass (token 1) like
    # the autograd path does; token 2's ~1e-52 only has to stay finite (documented: zero mass in fp32).
    mask[0, 2] = False
    out32 = loss_fn.fused(h32, w32, values.float(), indices, labels, mask, 4.0)
    want = loss_fn(h32 @ w32.T, values.float(), indices, labels, mask, 4.0)
    torch.testing.assert_close(out32.loss, want.loss, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads(out32.loss, h32, w32), grads(want.loss, h32, w32)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fused_float32_and_bfloat16_inputs() -> None:
    hidden, weight, values, indices, labels, mask = problem(seed=3, vocab=300, k=16, width=8)
    loss_fn = DistillationLoss(ce_weight=1.0, chunk_size=3)
    want = loss_fn.fused(hidden, weight, values, indices, labels, mask, 9.0)
    want_grads = grads(want.loss, hidden, weight)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
        h = hidden.detach().to(dtype).requires_grad_(True)
        w = weight.detach().to(dtype).requires_grad_(True)
        got = loss_fn.fused(h, w, values.half(), indices.to(torch.int64), labels, mask, 9.0)
        assert got.loss.dtype == torch.float32  # the loss itself is never half precision
        torch.testing.assert_close(got.loss.double(), want.loss, rtol=tol, atol=tol)
        for g, ref in zip(grads(got.loss, h, w), want_grads):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), ref, rtol=tol, atol=tol)


def test_fused_backward_scaling_and_retained_graph() -> None:
    """Gradients follow the incoming gradient, and a retained graph can be backpropagated twice."""
    hidden, weight, values, indices, labels, mask = problem(seed=4)
    loss_fn = DistillationLoss("tv", ce_weight=0.2, chunk_size=2)
    base = grads(loss_fn.fused(hidden, weight, values, indices, labels, mask, 8.0).loss, hidden, weight)

    out = loss_fn.fused(hidden, weight, values, indices, labels, mask, 8.0)
    (3.0 * out.loss).backward(retain_graph=True)
    (2.0 * out.loss).backward()
    torch.testing.assert_close(hidden.grad, 5.0 * base[0])
    torch.testing.assert_close(weight.grad, 5.0 * base[1])


def test_fused_no_grad_and_empty_mask() -> None:
    hidden, weight, values, indices, labels, mask = problem(seed=5)
    loss_fn = DistillationLoss(chunk_size=3)
    with torch.no_grad():
        evaluated = loss_fn.fused(hidden, weight, values, indices, labels, mask, 6.0)
    assert not evaluated.loss.requires_grad and evaluated.loss.item() > 0
    empty = loss_fn.fused(hidden, weight, values, indices, labels, torch.zeros_like(mask), 6.0)
    assert empty.loss.item() == 0.0 and empty.metrics["tokens"] == 0
    g_h, g_w = grads(empty.loss, hidden, weight)
    assert g_h.abs().max() == 0 and g_w.abs().max() == 0


def test_fused_validation() -> None:
    hidden, weight, values, indices, labels, mask = problem(seed=6)
    loss_fn = DistillationLoss()
    with pytest.raises(ValueError, match="hidden width 6 does not match"):
        loss_fn.fused(hidden, weight[:, :5], values, indices, labels, mask, 1.0)
    with pytest.raises(ValueError, match="normaliser must be"):
        loss_fn.fused(hidden, weight, values, indices, labels, mask, -2.0)


@pytest.mark.parametrize("fused", [False, True])
def test_reduction_is_invariant_to_micro_batch_split(fused: bool) -> None:
    """Sum of micro-batch losses with the global normaliser == one big batch: 1x4 == 2x2 == 4x1."""
    hidden, weight, values, indices, labels, mask = problem(seed=7, batch=4, seq=5)
    mask[3] = False
    mask[3, 0] = True  # uneven counted tokens per row
    normaliser = float(mask.sum())
    loss_fn = DistillationLoss("jsd", temperature=2.0, ce_weight=0.5, beta=0.3, chunk_size=3)

    def run(rows: slice) -> torch.Tensor:
        args = (values[rows], indices[rows], labels[rows], mask[rows], normaliser)
        if fused:
            return loss_fn.fused(hidden[rows], weight, *args).loss
        return loss_fn(hidden[rows] @ weight.T, *args).loss

    results = []
    for micro in (4, 2, 1):
        hidden.grad = weight.grad = None
        total = 0.0
        for start in range(0, 4, micro):
            loss = run(slice(start, start + micro))
            loss.backward()  # gradient accumulation, as an engine would do it
            total += loss.item()
        results.append((total, hidden.grad.clone(), weight.grad.clone()))
    for total, g_h, g_w in results[1:]:
        assert total == pytest.approx(results[0][0], rel=1e-12)
        torch.testing.assert_close(g_h, results[0][1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_w, results[0][2], rtol=1e-12, atol=1e-14)
