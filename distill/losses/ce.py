"""Plain cross-entropy on hard labels: training with no teacher (`teacher.source=none`).

Used for supervised fine-tuning on teacher-generated completions (hard-label distillation) and for
pretraining specialist teachers. Same reduction contract as the KD loss (`kd.py`): a sum over counted
tokens divided by `normaliser`, the number of counted tokens in the global batch. A position counts
where `mask` is set and it has a label (not -100). `fused_cross_entropy` runs the LM head a chunk of
tokens at a time through the KD loss's fused kernel, so the [tokens x vocab] logits never exist in full.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .kd import (
    _SUM_KEYS,
    IGNORE_INDEX,
    LossOutput,
    _FusedLinearLoss,
    check_normaliser,
    metric_value,
    select_rows,
)

_CE, _CE_TOKENS = _SUM_KEYS.index("ce_sum"), _SUM_KEYS.index("ce_tokens")


def _output(loss: Tensor, ce_sum: Tensor, tokens: Tensor | int) -> LossOutput:
    """Metric sums named like the KD loss's (`ce_sum`, `tokens`), so the training loop logs train/ce; floats,
    or 0-d tensors inside `metrics_on_device` (no host sync)."""
    if not isinstance(tokens, int):
        tokens = metric_value(tokens)  # a tensor inside `metrics_on_device`, else an int
    return LossOutput(
        loss, {"ce_sum": metric_value(ce_sum), "tokens": tokens if torch.is_tensor(tokens) else float(tokens)}
    )


def cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor | None, normaliser: float) -> LossOutput:
    """CE from full logits [B, T, V] (computed in fp32); the reference for `fused_cross_entropy`."""
    z, lab = select_rows(mask, logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long())
    ce = torch.nn.functional.cross_entropy(
        z.to(torch.promote_types(z.dtype, torch.float32)), lab, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return _output(ce / check_normaliser(normaliser), ce, (lab != IGNORE_INDEX).sum())


def _ce_chunk(logits: Tensor, _values, _idx, labels: Tensor, *, scale: float, need_grad: bool):
    """Loss, metric sums and d(loss)/d(logits) = scale * (softmax - onehot) of one chunk, in place. Rows
    without a label (-100) count for nothing: weighted by zero, not selected, so no host sync."""
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0).unsqueeze(-1)
    lse = logits.logsumexp(-1)
    ce = torch.where(valid, lse - logits.gather(-1, safe).squeeze(-1), 0.0).sum()
    sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=logits.device)
    sums[_CE], sums[_CE_TOKENS] = ce.detach().double(), valid.sum()
    if not need_grad:
        return ce * scale, sums, None
    weight = valid.to(logits.dtype).unsqueeze(-1)
    grad = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(weight)
    grad.scatter_add_(-1, safe, -weight)
    return ce * scale, sums, grad.mul_(scale)


def fused_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    mask: Tensor | None,
    normaliser: float,
    chunk_size: int = 1024,
) -> LossOutput:
    """Same as `cross_entropy(hidden @ lm_head_weight.T, ...)`, `chunk_size` tokens at a time.

    hidden [B, T, H], lm_head_weight [V, H]; only counted positions enter the computation.
    """
    h, lab = select_rows(mask, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long())
    none = h.new_empty(len(h), 0)  # the fused kernel's teacher inputs: there is no teacher
    chunk_fn = functools.partial(_ce_chunk, scale=1.0 / check_normaliser(normaliser))
    loss, sums = _FusedLinearLoss.apply(h, lm_head_weight, none, none.long(), lab, chunk_fn, chunk_size)
    return _output(loss, sums[_CE], sums[_CE_TOKENS])
