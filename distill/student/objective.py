"""The student model and its training loss as one module, so DeepSpeed sees a single forward.

With `fused=True` the LM head and the loss are computed together, `chunk_size` tokens at a time
(`DistillationLoss.fused`): the [tokens x vocab] student logits never exist in full. The LM head's
weight is then used outside the head's own forward, which ZeRO-3 must be told about
(`register_external_parameter`) so it gathers the weight for this module's forward and backward.

With a `FeatureProjector` (feature distillation, `features.layer_map`), the mapped student layers' hidden
states are projected to the teacher's width and scored against the teacher's hidden states; that loss is
added to the KD loss. The projector is a submodule, so DeepSpeed's optimizer trains it and DeepSpeed
checkpoints hold it, while the exported student (`engine.module.model`) never includes it.
"""

from __future__ import annotations

import logging

import deepspeed
import torch
from omegaconf import OmegaConf

from distill.config import ConfigError, FeatureConfig
from distill.losses import DistillationLoss, FeatureProjector, LossOutput, parse_layer_map
from distill.losses.ce import cross_entropy, fused_cross_entropy
from distill.models import hidden_size, num_hidden_layers, plain_lm_head

log = logging.getLogger("distill")


def resolve_layer_map(spec, student_dir: str, teacher_dir: str) -> dict[int, int]:
    """`features.layer_map` as {student layer: teacher layer}, range-checked against both models' depths
    (read from config.json: no weights are loaded). Layer j = output of decoder layer j."""
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    student_layers, teacher_layers = num_hidden_layers(student_dir), num_hidden_layers(teacher_dir)
    try:
        return parse_layer_map(spec, student_layers, teacher_layers)
    except ValueError as e:
        raise ConfigError(
            f"features.layer_map={spec!r}: {e} (student {student_dir}: {student_layers} layers, "
            f"teacher {teacher_dir}: {teacher_layers} layers)."
        ) from None


def build_projector(
    features: FeatureConfig, student_dir: str, teacher_dir: str, seed: int = 0
) -> FeatureProjector | None:
    """The feature projector `features` asks for, or None when feature distillation is off.

    Initialised from `seed` alone, so every rank (and a resumed job, before loading) builds the same one.
    """
    if features.layer_map is None:
        return None
    layer_map = resolve_layer_map(features.layer_map, student_dir, teacher_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FeatureProjector(
            layer_map, hidden_size(student_dir), hidden_size(teacher_dir), features.loss, features.weight
        )


def _feature_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The projector's metric sums, named for the training loop: every `*_sum` key is logged as
    train/<name> per counted token; "tokens" is already counted by the KD loss."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("feature_sum/"):  # per mapped layer, "feature_sum/0->1" -> train/feature/0->1
            out[f"feature/{key[len('feature_sum/') :]}_sum"] = value
        elif key != "tokens":
            out[key] = value
    return out


class StudentObjective(torch.nn.Module):
    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: DistillationLoss,
        fused: bool,
        projector: FeatureProjector | None = None,
    ):
        super().__init__()
        self.model, self.loss_fn, self.projector = model, loss_fn, projector
        self.fused = fused and plain_lm_head(model)
        if fused and not self.fused:
            log.warning("the student's LM head is not a plain linear map; using the unfused loss")
        if self.fused:
            deepspeed.zero.register_external_parameter(self, model.get_output_embeddings().weight)

    @property
    def teacher_layers(self) -> list[int] | None:
        """The teacher layers whose hidden states the forward needs (None: no feature distillation)."""
        if self.projector is None:
            return None
        return sorted(set(self.projector.layer_map.values()))

    def forward(
        self,
        input_ids,
        teacher_values,
        teacher_indices,
        labels,
        mask,
        normaliser: float,
        step: int,
        teacher_hidden: dict[int, torch.Tensor] | None = None,
        teacher_offset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (loss, metric sums) as a plain tuple: ZeRO-3 hooks its backward gathering onto the
        tensors it finds in a module's outputs, and it looks inside tuples, not dataclasses.

        `teacher_values` None (no teacher): plain cross-entropy where `mask` is set and there is a label.

        `teacher_hidden` = {teacher layer: hidden state [B, T, H_teacher]}, needed with a projector.
        `teacher_offset` [B, T]: the sampled sparsifiers' KL constant (distill/teacher/sparsify.py).
        """
        if teacher_values is None:  # no teacher (teacher.source=none): cross-entropy on the labels only
            return self._cross_entropy(input_ids, labels, mask, normaliser)
        teacher = (teacher_values, teacher_indices, labels, mask, normaliser)
        features = self.projector is not None
        if self.fused:
            out = self.model.get_decoder()(input_ids=input_ids, output_hidden_states=features)
            kd: LossOutput = self.loss_fn.fused(
                out.last_hidden_state,
                self.model.get_output_embeddings().weight,
                *teacher,
                step=step,
                teacher_offset=teacher_offset,
            )
        else:
            out = self.model(input_ids=input_ids, output_hidden_states=features)
            kd = self.loss_fn(out.logits, *teacher, step=step, teacher_offset=teacher_offset)
        if not features:
            return kd.loss, kd.metrics
        if not teacher_hidden:
            raise ValueError("feature distillation needs the teacher's hidden states (teacher_hidden)")
        student_hidden = {i: out.hidden_states[i + 1] for i in self.projector.layer_map}
        # `.forward`, not `__call__`: the projector returns a dataclass, whose tensors ZeRO-3's module hooks
        # cannot find (it warns); the projector owns no parameters itself, and its Linear layers, which do,
        # are still hooked (gathered for their forward and backward) as usual.
        feat = self.projector.forward(student_hidden, teacher_hidden, mask, normaliser)
        return kd.loss + feat.loss, {**kd.metrics, **_feature_metrics(feat.metrics)}

    def _cross_entropy(self, input_ids, labels, mask, normaliser: float) -> tuple[torch.Tensor, dict]:
        if self.fused:
            hidden = self.model.get_decoder()(input_ids=input_ids).last_hidden_state
            head = self.model.get_output_embeddings().weight
            out = fused_cross_entropy(hidden, head, labels, mask, normaliser, self.loss_fn.chunk_size)
        else:
            out = cross_entropy(self.model(input_ids=input_ids).logits, labels, mask, normaliser)
        return out.loss, out.metrics
