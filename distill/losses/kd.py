"""The training loss: sparse KD divergence (T^2-scaled) mixed with cross-entropy on hard labels.

Reduction contract (why the caller passes `normaliser`): the loss is a SUM over counted tokens divided by
the number of counted tokens in the GLOBAL batch, i.e. all micro-batches of one optimizer step on all
data-parallel ranks. Each micro-batch's loss is then its exact share of the global mean, so summing the
gradients of micro-batches (gradient accumulation) and of ranks (all-reduce SUM) gives the same update
whatever the micro-batch size, accumulation steps or data-parallel size, even when the number of counted
tokens differs between micro-batches. Consequences for callers:

* all-reduce the global token count before the step (or compute it from the packed batches);
* do not let the engine average again: with DeepSpeed use ``engine.backward(loss, scale_wrt_gas=False)``
  and remember DDP / ZeRO average gradients over ranks, so multiply the loss by the world size (or pass
  ``normaliser = global_tokens / world_size``) when the engine divides by it;
* `metrics` are SUMS (plus counts) so they can be all-reduced and divided the same way.

CE is divided by the same normaliser (counted tokens, not label tokens), so it weighs every counted token
equally with the KD term.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .divergences import (
    DIVERGENCES,
    TAILS,
    compute_dtype,
    divergence_from_logprobs,
    has_tail_bucket,
    sparse_from_reductions,
    student_tail_lse,
    warn_if_small_k,
)
from .schedule import parse_schedule

IGNORE_INDEX = -100
# Order of the per-chunk metric sums carried as one tensor (one host sync per call, not six).
_SUM_KEYS = (
    "kd_sum",
    "ce_sum",
    "teacher_topk_mass_sum",
    "student_mass_on_teacher_topk_sum",
    "top1_match_sum",
    "ce_tokens",
)


_METRICS_ON_DEVICE = contextvars.ContextVar("distill_metrics_on_device", default=False)


@contextlib.contextmanager
def metrics_on_device(enabled: bool = True) -> Iterator[None]:
    """Within this block every loss of the library (KD, cross-entropy, features) returns its metric sums as
    0-d tensors on the loss's device instead of Python floats: the same numbers, but reading them is left
    to the caller, so a training loop sums them on the device and syncs the host once per optimizer step
    (launch/student.py) instead of once per micro-batch. Counts that are host integers already (shapes)
    stay floats."""
    token = _METRICS_ON_DEVICE.set(enabled)
    try:
        yield
    finally:
        _METRICS_ON_DEVICE.reset(token)


def metric_value(value: Tensor) -> float | Tensor:
    """A 0-d metric as the caller asked for it (`metrics_on_device`): a detached tensor, or a float."""
    return value.detach() if _METRICS_ON_DEVICE.get() else value.item()


def select_rows(keep: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The rows of `tensors` (each [n, ...], on one device) where `keep` ([n] bool) is set.

    A `keep` on the host selects rows of accelerator tensors without waiting for the device: the row
    numbers are found on the host and copied ahead of the kernels that read them (pinned, non-blocking),
    so the training loop passes its host-side loss masks. A `keep` on an accelerator costs one host sync
    (the selection's size depends on it). All rows kept: the tensors themselves, nothing copied."""
    if keep is None:
        return tensors
    keep = keep.reshape(-1).bool()
    if keep.device.type == "cpu" and tensors[0].device.type != "cpu":
        if bool(keep.all()):
            return tensors
        rows = keep.nonzero().squeeze(1)
        if tensors[0].device.type == "cuda":
            rows = rows.pin_memory()
        rows = rows.to(tensors[0].device, non_blocking=True)
        return tuple(t.index_select(0, rows) for t in tensors)
    keep = keep.to(tensors[0].device)
    if bool(keep.all()):
        return tensors
    return tuple(t[keep] for t in tensors)


def check_teacher_indices(indices: Tensor, vocab: int) -> None:
    """Teacher ids must index the student's vocabulary (a shared tokenizer); reads `indices` on the host
    (one sync when they live on an accelerator: the training loop checks its replies before the copy)."""
    if indices.numel():
        lo, hi = (int(v) for v in torch.aminmax(indices))
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"teacher_indices span [{lo}, {hi}] but the student vocabulary has {vocab} entries; "
                "teacher and student must share a tokenizer (and padded vocab size)"
            )


@dataclass
class LossOutput:
    """`loss` is the scalar to backpropagate; `metrics` are sums over counted tokens (all-reduce, divide).

    Metrics: kd_sum (raw divergence D, no T^2, no weight), ce_sum (CE at T=1 over tokens with a label),
    teacher_topk_mass_sum (sum_k p at T=1), student_mass_on_teacher_topk_sum (student mass on the
    teacher's ids at T=1), top1_match_sum (student argmax == teacher's top-1 id), tokens (counted
    tokens), ce_tokens (counted tokens with a label). Floats, or 0-d tensors inside `metrics_on_device`.
    """

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def check_normaliser(normaliser: Any) -> float:
    """The global counted-token count; a clear error beats a silent inf/NaN loss."""
    try:
        value = float(normaliser)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(normaliser, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            "normaliser must be a finite number > 0 (counted tokens in the global batch; pass "
            f"max(count, 1)), got {normaliser!r}"
        )
    return value


def _number(name: str, value: Any, *, minimum: float, strict: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _unit(name: str, value: Any, meaning: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1] ({meaning}), got {value!r}")
    return float(value)


class DistillationLoss:
    """Per-token KD divergence (sparse, T^2-scaled) mixed with CE on hard labels.

    loss = sum over counted tokens of (kd_weight * T^2 * D + ce_weight * CE) / normaliser.

    `temperature` is the distillation temperature applied to both sides of D (see
    `distill.losses.divergences`); it is unrelated to the teacher's sampling temperature when it
    generated text. T^2 keeps the gradient scale comparable across temperatures (Hinton et al.).
    `schedule` ramps kd_weight / ce_weight / temperature over optimizer steps (see `schedule.py`).
    `chunk_size` bounds the student logits `fused` materialises at once (chunk_size x V in fp32).

    Inputs of both entry points: teacher_values [B, T, k] (the teacher's log-probs over its full
    vocabulary at T=1, any float dtype) and teacher_indices [B, T, k] (any integer dtype); labels [B, T]
    next-token targets already aligned with the positions, -100 = no CE target (None = no CE at all);
    mask [B, T] bool, the positions that count (None = all): KD counts where mask, CE where mask and a
    label; normaliser = counted tokens in the global batch (module docstring); step = optimizer step for
    the schedule; teacher_offset [B, T] (sampled sparsifiers, distill/teacher/sparsify.py): a constant per
    position added to the KD term so that its value estimates the full-vocabulary KL without bias (forward
    KL at temperature 1 only; no gradient). Positions outside the mask are dropped before any computation,
    so their teacher data may be padding or garbage.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        tail: str = "bucket",
        beta: float = 0.5,
        alpha: float = 0.1,
        chunk_size: int = 1024,
        schedule: Mapping[str, Any] | None = None,
    ) -> None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence {divergence!r} unknown; expected one of {', '.join(DIVERGENCES)}")
        if tail not in TAILS:
            raise ValueError(f"tail {tail!r} unknown; expected one of {', '.join(TAILS)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"chunk_size must be an integer >= 1 (tokens per fused chunk), got {chunk_size!r}"
            )
        self.divergence = divergence
        self.tail = tail
        self.temperature = _number("temperature", temperature, minimum=0.0, strict=True)
        self.kd_weight = _number("kd_weight", kd_weight, minimum=0.0)
        self.ce_weight = _number("ce_weight", ce_weight, minimum=0.0)
        self.beta = _unit("beta", beta, "0 = forward KL, 1 = reverse KL")
        self.alpha = _unit("alpha", alpha, "skew mixture weight")
        if divergence.startswith("skew_") and self.alpha == 1.0:
            raise ValueError(
                f"alpha=1 makes {divergence} identically 0 (the mixture is the target); use alpha < 1"
            )
        self.chunk_size = chunk_size
        self.schedule = parse_schedule(schedule)
        weights_scheduled = {"kd_weight", "ce_weight"} & set(self.schedule)
        if self.kd_weight == 0.0 and self.ce_weight == 0.0 and not weights_scheduled:
            raise ValueError(
                "kd_weight and ce_weight are both 0, so the loss is always 0; set one of them > 0"
            )

    def __repr__(self) -> str:
        return (
            f"DistillationLoss(divergence={self.divergence!r}, temperature={self.temperature}, "
            f"kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, tail={self.tail!r}, beta={self.beta}, "
            f"alpha={self.alpha}, chunk_size={self.chunk_size}, schedule={self.schedule})"
        )

    def values_at(self, step: int) -> dict[str, float]:
        """temperature, kd_weight and ce_weight in effect at optimizer step `step`."""
        values = {"temperature": self.temperature, "kd_weight": self.kd_weight, "ce_weight": self.ce_weight}
        for name, ramp in self.schedule.items():
            values[name] = ramp.at(step)
        return values

    # ---------------------------------------------------------- per-token terms (shared by both paths)

    def _reduced_losses(
        self,
        student_ids: Tensor,
        tail_lse: Tensor | None,
        lse_all: Tensor,
        label_logit: Tensor,
        values: Tensor,
        valid: Tensor,
        knobs: dict[str, float],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token (weighted total, D, CE) from the few per-token numbers the loss depends on.

        The student's [n, V] logits enter only through the logits at the teacher's ids, the log-mass
        outside them (bucket), the log-normaliser and the label's logit. Both paths build these four and
        call this; the fused path then pushes their small gradients back onto the vocabulary itself.
        """
        temperature, kd_w, ce_w = knobs["temperature"], knobs["kd_weight"], knobs["ce_weight"]
        warn_if_small_k(student_ids.shape[-1], temperature)
        logp, logq = sparse_from_reductions(student_ids, tail_lse, values, temperature)
        kd = divergence_from_logprobs(logp, logq, self.divergence, self.beta, self.alpha)
        ce = torch.where(valid, lse_all - label_logit, torch.zeros_like(lse_all))
        # KD stays in the graph even at weight 0, so backward works when both weights are scheduled to 0.
        total = (kd_w * temperature * temperature) * kd
        if ce_w != 0.0:
            total = total + ce_w * ce
        return total, kd, ce

    @staticmethod
    def _sums(
        kd: Tensor, ce: Tensor, values: Tensor, student_mass: Tensor, top1: Tensor, valid: Tensor
    ) -> Tensor:
        teacher_mass = values.to(torch.promote_types(values.dtype, torch.float32)).logsumexp(-1).exp()
        parts = (kd.sum(), ce.sum(), teacher_mass.sum(), student_mass.sum(), top1.sum(), valid.sum())
        return torch.stack([part.detach().to(torch.float64) for part in parts])

    @staticmethod
    def _teacher_top1(values: Tensor, idx: Tensor) -> Tensor:
        return idx.gather(-1, values.argmax(-1, keepdim=True)).squeeze(-1)

    def _fused_chunk(
        self,
        logits: Tensor,
        values: Tensor,
        idx: Tensor,
        labels: Tensor,
        *,
        knobs: dict[str, float],
        bucket: bool,
        scale: float,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Loss, metric sums and d(loss)/d(logits) of one chunk, overwriting `logits` (a buffer we own).

        Six passes over the chunk's [c, V] buffer and no other buffer of that size: max, exp(z - max) in
        place, two sums, and the gradient written over the exponentials. Gradient assembly, with
        e = exp(z - max), s_all = sum e and s_tail = sum over ids the teacher did not send:
        d lse_all / dz = e / s_all; d tail_lse / dz = e / s_tail outside the ids; the ids and the label
        get their own gradient added at their positions.
        """
        z_max, argmax = logits.max(-1)
        student_ids = logits.gather(-1, idx)
        safe_labels = labels.clamp(min=0).unsqueeze(-1)
        label_logit = logits.gather(-1, safe_labels).squeeze(-1)
        e = logits.sub_(z_max.unsqueeze(-1)).exp_()
        s_all = e.sum(-1)
        e_ids = e.gather(-1, idx)
        e.scatter_(-1, idx, 0.0)  # from here on `e` holds only the mass outside the teacher's ids
        s_tail = e.sum(-1) if bucket else None
        lse_all = z_max + s_all.log()
        tail_lse = z_max + s_tail.log() if s_tail is not None else None  # log(0) = -inf is handled
        valid = labels != IGNORE_INDEX
        leaves = [student_ids, lse_all, label_logit] + ([tail_lse] if tail_lse is not None else [])
        with torch.set_grad_enabled(need_grad):
            for leaf in leaves:
                leaf.requires_grad_(need_grad)
            total, kd, ce = self._reduced_losses(
                student_ids, tail_lse, lse_all, label_logit, values, valid, knobs
            )
            chunk_loss = total.sum() * scale
        sums = self._sums(
            kd, ce, values, e_ids.sum(-1) / s_all, argmax == self._teacher_top1(values, idx), valid
        )
        if not need_grad:
            return chunk_loss.detach(), sums, None
        grads = torch.autograd.grad(chunk_loss, leaves, allow_unused=True)
        g_ids, g_all, g_label, *g_tail = (
            torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)
        )
        coef_all = g_all / s_all
        coef_outside = coef_all
        if s_tail is not None:
            # a tail below fp32's normal range (< 1e-38 of the top logit's mass) gets no gradient
            tiny = torch.finfo(s_tail.dtype).tiny
            coef_outside = coef_all + torch.where(s_tail > tiny, g_tail[0] / s_tail, torch.zeros_like(s_tail))
        grad = e.mul_(coef_outside.unsqueeze(-1))
        grad.scatter_(-1, idx, e_ids * coef_all.unsqueeze(-1) + g_ids)
        grad.scatter_add_(-1, safe_labels, g_label.unsqueeze(-1))
        return chunk_loss.detach(), sums, grad

    # ------------------------------------------------------------------ input plumbing

    def _rows(
        self,
        student: Tensor,
        teacher_values: Tensor,
        teacher_indices: Tensor,
        labels: Tensor | None,
        mask: Tensor | None,
        vocab: int,
        normaliser: float,
        student_name: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flatten [B, T, ...] to counted rows [n, ...] so padding never enters the computation."""
        lead = student.shape[:-1]
        if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:-1] != lead:
            raise ValueError(
                f"teacher_values {tuple(teacher_values.shape)} and teacher_indices "
                f"{tuple(teacher_indices.shape)} must both be [*{tuple(lead)}, k] to match {student_name} "
                f"{tuple(student.shape)}"
            )
        if labels is not None and labels.shape != lead:
            raise ValueError(f"labels {tuple(labels.shape)} must be {tuple(lead)} to match {student_name}")
        if mask is not None and mask.shape != lead:
            raise ValueError(f"mask {tuple(mask.shape)} must be {tuple(lead)} to match {student_name}")
        check_normaliser(normaliser)
        count = math.prod(lead)
        k = teacher_values.shape[-1]
        flat_student = student.reshape(count, student.shape[-1])
        values = teacher_values.detach().reshape(count, k)
        idx = teacher_indices.reshape(count, k).long()
        lab = labels.reshape(count).long() if labels is not None else idx.new_full((count,), IGNORE_INDEX)
        flat_student, values, idx, lab = select_rows(mask, flat_student, values, idx, lab)
        if idx.device.type == "cpu" or not _METRICS_ON_DEVICE.get():
            check_teacher_indices(idx, vocab)  # in the training loop: checked on the host, before the copy
        return flat_student, values, idx, lab

    def _with_offset(
        self, loss: Tensor, sums: Tensor, offset: Tensor | None, mask: Tensor | None, step: int, normaliser
    ) -> tuple[Tensor, Tensor]:
        """Loss and metric sums with the sampled sparsifiers' per-position constant added to the KD term
        (counted positions only): the KD value then estimates the full-vocabulary KL without bias."""
        if offset is None:
            return loss, sums
        knobs = self.values_at(step)
        if self.divergence != "forward_kl" or knobs["temperature"] != 1.0:
            raise ValueError(
                f"a sampled teacher (stream.sparsifier sample / topk_sample) estimates forward KL at "
                f"temperature 1; the loss is {self.divergence} at temperature {knobs['temperature']}: use "
                f"loss=forward_kl (or kd_ce) with loss.temperature=1, or stream.sparsifier=topk"
            )
        (kept,) = select_rows(mask, offset.detach().reshape(-1))
        total = kept.to(torch.float64).sum()
        sums = torch.cat([sums[:1] + total, sums[1:]])  # _SUM_KEYS[0] is kd_sum
        return loss + (knobs["kd_weight"] * total / check_normaliser(normaliser)).to(loss.dtype), sums

    def _output(self, loss: Tensor, sums: Tensor, tokens: int) -> LossOutput:
        values = sums.unbind() if _METRICS_ON_DEVICE.get() else sums.tolist()  # no host sync, or one
        metrics = dict(zip(_SUM_KEYS, values))
        metrics["tokens"] = float(tokens)
        return LossOutput(loss=loss, metrics=metrics)

    # ------------------------------------------------------------------ public entry points

    def __call__(
        self,
        logits: Tensor,
        teacher_values: Tensor,
        teacher_indices: Tensor,
        labels: Tensor | None,
        mask: Tensor | None,
        normaliser: float,
        step: int = 0,
        teacher_offset: Tensor | None = None,
    ) -> LossOutput:
        """Loss from full student logits [B, T, V] (any float dtype; computed in fp32).

        Plain autograd, so also the reference for `fused`. Memory: several [counted tokens, V] fp32
        tensors; prefer `fused` for training with large vocabularies.
        """
        z, values, idx, lab = self._rows(
            logits, teacher_values, teacher_indices, labels, mask, logits.shape[-1], normaliser, "logits"
        )
        z = z.to(compute_dtype(z))
        knobs = self.values_at(step)
        bucket = has_tail_bucket(self.tail, idx.shape[-1], z.shape[-1])
        student_ids = z.gather(-1, idx)
        tail_lse = student_tail_lse(z, idx) if bucket else None
        z_ce = z if knobs["ce_weight"] != 0.0 else z.detach()  # no [n, V] backward for an unused term
        lse_all = z_ce.logsumexp(-1)
        label_logit = z_ce.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        valid = lab != IGNORE_INDEX
        total, kd, ce = self._reduced_losses(
            student_ids, tail_lse, lse_all, label_logit, values, valid, knobs
        )
        with torch.no_grad():
            student_mass = (student_ids.logsumexp(-1) - lse_all).exp()
            top1 = z.argmax(-1) == self._teacher_top1(values, idx)
            sums = self._sums(kd, ce, values, student_mass, top1, valid)
        loss, sums = self._with_offset(
            total.sum() / check_normaliser(normaliser), sums, teacher_offset, mask, step, normaliser
        )
        return self._output(loss, sums, z.shape[0])

    def fused(
        self,
        hidden: Tensor,
        lm_head_weight: Tensor,
        teacher_values: Tensor,
        teacher_indices: Tensor,
        labels: Tensor | None,
        mask: Tensor | None,
        normaliser: float,
        step: int = 0,
        teacher_offset: Tensor | None = None,
    ) -> LossOutput:
        """Same loss as `__call__(hidden @ lm_head_weight.T, ...)` without materialising the full logits.

        hidden [B, T, H], lm_head_weight [V, H]. Tokens are processed chunk_size at a time; each chunk's
        gradients w.r.t. hidden and lm_head_weight are computed right away (inside forward) and handed
        back in backward. One chunk x V fp32 buffer is the only vocabulary-sized temporary (the loss and
        its gradient are computed in place in it), and the matmul work equals the unfused version (three
        GEMMs). The lm_head gradient is accumulated in fp32 for half-precision weights.

        Precision: the student's mass outside the teacher's ids is summed as exp(logit - max logit), so
        in fp32 a tail below ~1e-38 of the top token's mass underflows and counts as zero mass (no
        gradient through it); `__call__` resolves it in log space. That needs a logit gap of ~87 between
        the top token and every token the teacher did not send, which trained LMs do not produce.
        """
        vocab, width = lm_head_weight.shape
        if hidden.shape[-1] != width:
            raise ValueError(
                f"hidden width {hidden.shape[-1]} does not match lm_head_weight {tuple(lm_head_weight.shape)}"
            )
        h, values, idx, lab = self._rows(
            hidden, teacher_values, teacher_indices, labels, mask, vocab, normaliser, "hidden"
        )
        chunk_fn = functools.partial(
            self._fused_chunk,
            knobs=self.values_at(step),
            bucket=has_tail_bucket(self.tail, idx.shape[-1], vocab),
            scale=1.0 / check_normaliser(normaliser),
        )
        loss, sums = _FusedLinearLoss.apply(h, lm_head_weight, values, idx, lab, chunk_fn, self.chunk_size)
        loss, sums = self._with_offset(loss, sums, teacher_offset, mask, step, normaliser)
        return self._output(loss, sums, h.shape[0])


def _keep_graph() -> bool:
    """Whether the running backward was asked to retain the graph (then saved grads must survive)."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if getter is None else bool(getter())


class _FusedLinearLoss(torch.autograd.Function):
    """Chunked lm_head matmul + loss whose gradients are computed during forward.

    Computing the gradients in forward (instead of recomputing logits in backward) keeps the matmul count
    at three per chunk, the same as the plain version (recomputation would add a fourth). Backward
    returns them scaled by the incoming gradient; when the graph is not retained they are released as
    they are handed over, so autograd can adopt the buffers instead of copying them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        values: Tensor,
        idx: Tensor,
        labels: Tensor,
        chunk_fn: Callable[..., tuple[Tensor, Tensor, Tensor | None]],
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        hidden, weight = hidden.detach(), weight.detach()
        dtype = compute_dtype(hidden, weight)
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            h = hidden[start:end]
            logits = (h @ weight.t()).to(dtype)  # the one [chunk, V] fp32 buffer; chunk_fn overwrites it
            chunk_loss, chunk_sums, grad_logits = chunk_fn(
                logits, values[start:end], idx[start:end], labels[start:end], need_grad=need_grad
            )
            loss += chunk_loss
            sums += chunk_sums
            if grad_logits is None:
                continue
            if grad_h is not None:
                grad_h[start:end] = grad_logits.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t().to(acc_dtype), h.to(acc_dtype))
            del logits, grad_logits
        ctx.grads = (grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, _grad_sums: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        owned = not _keep_graph()
        if owned:
            ctx.grads = (None, None)
        # skip multiplying by 1 where checking is free; on an accelerator the check would sync the host
        # (multiplying by 1 is exact, so both give the same gradients)
        unit = grad_loss.device.type == "cpu" and bool(grad_loss == 1)
        if grad_h is not None and not unit:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            if not unit:
                grad_w = grad_w.mul_(grad_loss) if owned else grad_w * grad_loss
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None
