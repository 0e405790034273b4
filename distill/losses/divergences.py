"""Per-token divergences between a teacher distribution p and a student distribution q.

Two entry points share one set of formulas (`divergence_from_logprobs`, on normalised log-probs):

* `dense_divergence` compares full-vocabulary logits (evaluation, references).
* `sparse_divergence` compares the student's logits with the teacher's streamed top-k log-probs.

Sparse tail treatments (the teacher's values are log-probs normalised over the FULL vocabulary at T=1):

* ``bucket`` (default): a (k+1)-th entry holds the mass outside the teacher's ids, on both sides.
  Teacher tail = 1 - sum_k p (computed as log1mexp(logsumexp(values)); zero mass when rounding makes the
  top-k sum reach 1, and the k+1 entries are then renormalised). Student tail = the student's mass on the
  ids the teacher did NOT send, computed as a logsumexp over those ids: mathematically the same as
  1 - sum_ids q, but exact when that difference is tiny and with bounded gradients (the log1mexp route
  divides by the tail mass in backward and cancels catastrophically when the student is confident).
  Both sides are then proper distributions over k+1 entries, so every divergence stays >= 0.
  The teacher tail is only as precise as the streamed values: 1 - sum_k p inherits their rounding
  (bf16 values carry ~3 significant digits), so near-1 top-k masses give a coarse tail.
* ``renormalize``: both sides are renormalised over the k ids (log_softmax restricted to the ids).

With k = V (ids covering the vocabulary) there is no tail: the bucket is dropped and both treatments
equal the dense divergence to float rounding.

Temperature T (the distillation temperature, NOT the teacher's sampling temperature used when it
generated text): both sides are first reduced to the entries above at T=1, then every entry's log-mass
is divided by T and renormalised over those entries. For ``bucket`` the tail acts as ONE pseudo-token
with logit log(tail)/T. This is not the same as tempering the full vocabulary and then bucketing (the
tail's tempered mass is not knowable from its total mass), but it is consistent: identical models give
zero divergence at every T, and with k = V it is exactly the dense tempered divergence. Callers scale
the result by T^2 (kept out of these functions so they stay plain divergences).

Conventions (p = teacher, q = student):

* forward_kl       KL(p || q)
* reverse_kl       KL(q || p)
* jsd              TRL GKD's generalised JSD: beta*KL(p || m) + (1-beta)*KL(q || m), m = beta*p + (1-beta)*q,
                   with the endpoints special-cased as TRL does: beta=0 -> KL(p || q) (forward),
                   beta=1 -> KL(q || p) (reverse). The formula itself tends to 0 at both endpoints, so the
                   value jumps there; that is the published convention, kept for comparability.
* skew_forward_kl  KL(p || alpha*p + (1-alpha)*q)        (DistiLLM; alpha=0 -> forward KL, alpha=1 -> 0)
* skew_reverse_kl  KL(q || (1-alpha)*p + alpha*q)        (DistiLLM; alpha=0 -> reverse KL, alpha=1 -> 0)
* tv               0.5 * sum |p - q|
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
TAILS = ("bucket", "renormalize")

# Log-probability standing in for an exact zero (-inf). -inf would turn p*log(p/q) into 0*inf = NaN and
# poison gradients through logsumexp; exp(-100) is ~4e-44, i.e. nothing, yet stays finite. Only -inf
# entries are replaced (nan_to_num), so finite log-probs keep their value and gradient.
LOG_ZERO = -100.0

# Below this many teacher entries, tempering with T > 1 moves much of the mass into what k does not cover.
SMALL_K_WARNING = 256


def _check_kind(kind: str) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


def _check_params(temperature: float, beta: float, alpha: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (skew mixture weight), got {alpha!r}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 stays fp64 (references, gradcheck); everything else is computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _finite(logp: Tensor) -> Tensor:
    return torch.nan_to_num(logp, nan=float("nan"), posinf=float("inf"), neginf=LOG_ZERO)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf (Maechler's two-branch rule).

    Inputs above 0 (a top-k mass that rounding pushed past 1) are clamped to 0, giving -inf (no mass).
    """
    x = x.clamp(max=0.0)
    near_zero = x > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum a (log a - log b) over the last dim, from normalised log-probs."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w*a + (1-w)*b) in log space; the endpoints return an input unchanged (no log(0))."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence_from_logprobs(logp: Tensor, logq: Tensor, kind: str, beta: float, alpha: float) -> Tensor:
    """Divergence between teacher log-probs `logp` and student log-probs `logq` (normalised, finite)."""
    if kind == "forward_kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(logp, logq)
        if beta == 1.0:
            return _kl(logq, logp)
        logm = _log_mix(logp, logq, beta)
        return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    if kind == "skew_forward_kl":
        return _kl(logp, _log_mix(logp, logq, alpha))
    if kind == "skew_reverse_kl":
        return _kl(logq, _log_mix(logp, logq, 1.0 - alpha))
    if kind == "tv":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    _check_kind(kind)
    raise AssertionError("unreachable")


def dense_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Full-vocabulary divergence per position ([..., V] -> [...]), no T^2 factor.

    `teacher_logits` may be logits or log-probs (log_softmax makes them the same). Used for evaluation and
    as the reference the sparse path must reproduce when k = V.
    """
    _check_kind(kind)
    _check_params(temperature, beta, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape"
        )
    dtype = compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    logq = _finite(F.log_softmax(s, dim=-1))
    logp = _finite(F.log_softmax(t, dim=-1))
    return divergence_from_logprobs(logp, logq, kind, beta, alpha)


def _check_sparse_shapes(student_logits: Tensor, teacher_values: Tensor, teacher_indices: Tensor) -> None:
    if teacher_values.shape != teacher_indices.shape:
        raise ValueError(
            f"teacher_values {tuple(teacher_values.shape)} and teacher_indices "
            f"{tuple(teacher_indices.shape)} must have the same shape [..., k]"
        )
    if student_logits.shape[:-1] != teacher_values.shape[:-1]:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_values {tuple(teacher_values.shape)} "
            "must agree on every dim but the last"
        )
    vocab, k = student_logits.shape[-1], teacher_indices.shape[-1]
    if k > vocab:
        raise ValueError(f"teacher sent k={k} ids but the student vocabulary has only {vocab} entries")


def has_tail_bucket(tail: str, k: int, vocab: int) -> bool:
    """The bucket exists unless the ids cover the vocabulary (then it would hold only rounding noise)."""
    if tail not in TAILS:
        raise ValueError(f"unknown tail treatment {tail!r}; expected one of {', '.join(TAILS)}")
    return tail == "bucket" and k < vocab


def student_tail_lse(z: Tensor, idx: Tensor) -> Tensor:
    """log of the student's (unnormalised) mass outside the ids: logsumexp of the remaining logits [...].

    Summed directly over those ids rather than as 1 - sum_ids q, so it is exact when the tail is tiny and
    its gradient (a softmax over the remaining ids) is bounded. The fill is finite so that a row whose
    remaining logits are all -inf still gets a finite (tiny) tail and NaN-free gradients.
    """
    return z.scatter(-1, idx, torch.finfo(z.dtype).min).logsumexp(-1)


def sparse_from_reductions(
    student_ids: Tensor,
    student_tail: Tensor | None,
    teacher_values: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the k (+1 with a tail) entries, tempered and renormalised.

    The sparse loss depends on the student's logits only through `student_ids` (the logits at the
    teacher's ids, [..., k]) and `student_tail` (`student_tail_lse`, [...], None without a bucket); the
    fused path computes these two cheaply per chunk and backpropagates through this function alone.
    Returns (logp, logq), each [..., k] or [..., k+1], normalised over the last dim and free of -inf.
    """
    teacher = teacher_values.to(student_ids.dtype)
    student = student_ids
    if student_tail is not None:
        teacher_tail = log1mexp(teacher.logsumexp(-1, keepdim=True))
        teacher = torch.cat([teacher, teacher_tail], dim=-1)
        student = torch.cat([student, student_tail.unsqueeze(-1)], dim=-1)
    if temperature != 1.0:
        teacher, student = teacher / temperature, student / temperature
    # Renormalising is exact at T=1 for a proper bucket and fixes top-k sums that rounding pushed past 1;
    # for the student it also removes the logits' arbitrary offset (logsumexp over V is never needed).
    logp = _finite(F.log_softmax(teacher, dim=-1))
    logq = _finite(F.log_softmax(student, dim=-1))
    return logp, logq


def sparse_logprobs(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    *,
    tail: str = "bucket",
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the k (renormalize) or k+1 (bucket) entries, tempered."""
    _check_sparse_shapes(student_logits, teacher_values, teacher_indices)
    bucket = has_tail_bucket(tail, teacher_indices.shape[-1], student_logits.shape[-1])
    z = student_logits.to(compute_dtype(student_logits, teacher_values))
    idx = teacher_indices.long()  # uint16 / int32 on the wire
    tail_lse = student_tail_lse(z, idx) if bucket else None
    return sparse_from_reductions(z.gather(-1, idx), tail_lse, teacher_values, temperature)


def warn_if_small_k(k: int, temperature: float) -> None:
    """Tempering with T > 1 flattens the teacher; with few ids most of that mass is outside the top-k."""
    if temperature > 1.0 and k < SMALL_K_WARNING:
        warnings.warn(
            f"distillation temperature > 1 with only k={k} teacher log-probs: the top-k keeps little of the "
            f"tempered teacher mass (bucket lumps it into one tail entry, renormalize drops it); "
            f"stream k >= {SMALL_K_WARNING} or use temperature <= 1",
            UserWarning,
            stacklevel=3,
        )


def sparse_divergence(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    kind: str,
    *,
    tail: str = "bucket",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Divergence per position between student logits [..., V] and the teacher's top-k [..., k] -> [...].

    `teacher_values` are the teacher's log-probs normalised over its full vocabulary at T=1 (any float
    dtype); `teacher_indices` their token ids (any integer dtype, distinct per position, as top-k gives).
    No T^2 factor is applied. See the module docstring for the tail and temperature definitions.
    """
    _check_kind(kind)
    _check_params(temperature, beta, alpha)
    warn_if_small_k(teacher_indices.shape[-1], temperature)
    logp, logq = sparse_logprobs(
        student_logits, teacher_values, teacher_indices, tail=tail, temperature=temperature
    )
    return divergence_from_logprobs(logp, logq, kind, beta, alpha)
