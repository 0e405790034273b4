"""The student model and its training loss as one module, so DeepSpeed sees a single forward.

With `fused=True` the LM head and the loss are computed together, `chunk_size` tokens at a time
(`DistillationLoss.fused`): the [tokens x vocab] student logits never exist in full. The LM head's
weight is then used outside the head's own forward, which ZeRO-3 must be told about
(`register_external_parameter`) so it gathers the weight for this module's forward and backward.
"""

from __future__ import annotations

import logging

import deepspeed
import torch

from distill.losses import DistillationLoss, LossOutput

log = logging.getLogger("distill")


def supports_fused_head(model: torch.nn.Module) -> bool:
    """True when logits are exactly `hidden @ head.weight.T` (no bias, scaling or soft-capping)."""
    head = model.get_output_embeddings()
    cfg = model.config
    plain = getattr(head, "bias", None) is None and not getattr(cfg, "final_logit_softcapping", None)
    return plain and getattr(cfg, "logit_scale", None) in (None, 1.0)


class StudentObjective(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, loss_fn: DistillationLoss, fused: bool):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.fused = fused and supports_fused_head(model)
        if fused and not self.fused:
            log.warning("the student's LM head is not a plain linear map; using the unfused loss")
        if self.fused:
            deepspeed.zero.register_external_parameter(self, model.get_output_embeddings().weight)

    def forward(
        self, input_ids, teacher_values, teacher_indices, labels, mask, normaliser: float, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (loss, metric sums) as a plain tuple: ZeRO-3 hooks its backward gathering onto the
        tensors it finds in a module's outputs, and it looks inside tuples, not dataclasses."""
        teacher = (teacher_values, teacher_indices, labels, mask, normaliser)
        if self.fused:
            hidden = self.model.get_decoder()(input_ids=input_ids).last_hidden_state
            out: LossOutput = self.loss_fn.fused(
                hidden, self.model.get_output_embeddings().weight, *teacher, step=step
            )
        else:
            out = self.loss_fn(self.model(input_ids=input_ids).logits, *teacher, step=step)
        return out.loss, out.metrics
