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

from .kd import _SUM_KEYS, IGNORE_INDEX, LossOutput, _FusedLinearLoss, check_normaliser, metric_value

_CE, _CE_TOKENS = _SUM_KEYS.index("ce_sum"), _SUM_KEYS.index("ce_tokens")


def _counted(labels: Tensor, mask: Tensor | None) -> Tensor:
    counted = labels != IGNORE_INDEX
    return counted if mask is None else counted & mask.bool()


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
    counted = _counted(labels, mask)
    z = logits[counted]
    ce = torch.nn.functional.cross_entropy(
        z.to(torch.promote_types(z.dtype, torch.float32)), labels[counted].long(), reduction="sum"
    )
    return _output(ce / check_normaliser(normaliser), ce, counted.sum())


def _ce_chunk(logits: Tensor, _values, _idx, labels: Tensor, *, scale: float, need_grad: bool):
    """Loss, metric sums and d(loss)/d(logits) = scale * (softmax - onehot) of one chunk, in place."""
    lse = logits.logsumexp(-1)
    ce = (lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()
    sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=logits.device)
    sums[_CE], sums[_CE_TOKENS] = ce.detach().double(), labels.numel()
    if not need_grad:
        return ce * scale, sums, None
    grad = logits.sub_(lse.unsqueeze(-1)).exp_()
    grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((len(labels), 1), -1.0))
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
    counted = _counted(labels, mask)
    h, lab = hidden[counted], labels[counted].long()
    none = h.new_empty(len(h), 0)  # the fused kernel's teacher inputs: there is no teacher
    chunk_fn = functools.partial(_ce_chunk, scale=1.0 / check_normaliser(normaliser))
    loss, sums = _FusedLinearLoss.apply(h, lm_head_weight, none, none.long(), lab, chunk_fn, chunk_size)
    return _output(loss, sums[_CE], len(lab))
