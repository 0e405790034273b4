"""Hidden-state (feature) distillation: a learned projection per mapped layer, MSE or cosine loss.

The student and teacher usually differ in width (cross-architecture), so each mapped student layer gets
its own nn.Linear(student_width, teacher_width) trained with the student. A layer map says which teacher
layer each student layer imitates, e.g. student layer i <-> teacher layer 2i+1 for a half-depth student.
Layer indices are whatever the caller's hidden-state containers use (with Hugging Face
``output_hidden_states`` index 0 is the embedding output).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kd import LossOutput, check_normaliser, metric_value, select_rows

FEATURE_LOSSES = ("mse", "cosine")
_RULE = re.compile(r"^(?:(\d+)\*?)?i(?:([+-])(\d+))?$")


def _index(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a layer index (int >= 0), got {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a layer index (int >= 0), got {value!r}")
    return value


def parse_layer_map(
    spec: Mapping[Any, Any] | Sequence[int] | str,
    num_student_layers: int | None = None,
    num_teacher_layers: int | None = None,
) -> dict[int, int]:
    """Student layer -> teacher layer.

    Accepts a mapping ``{0: 1, 1: 3}`` (string keys from YAML are fine), a sequence ``[1, 3, 5]``
    (position = student layer), an explicit string ``"0:1,1:3"``, or a linear rule in ``i`` such as
    ``"2i+1"``, ``"2*i+1"`` or ``"i"``, which needs `num_student_layers`. When the layer counts are given,
    every index is range-checked so a map written for another model fails here.
    """
    if isinstance(spec, str):
        text = spec.replace(" ", "").lower()
        match = _RULE.match(text)
        if match:
            if num_student_layers is None:
                raise ValueError(
                    f"layer map rule {spec!r} needs num_student_layers to know which layers to map"
                )
            scale = int(match.group(1)) if match.group(1) else 1
            offset = int(match.group(3) or 0) * (-1 if match.group(2) == "-" else 1)
            raw: dict[Any, Any] = {i: scale * i + offset for i in range(num_student_layers)}
        elif text and all(":" in part for part in text.split(",")):
            raw = dict(part.split(":", 1) for part in text.split(","))
        else:
            raise ValueError(
                f"layer map {spec!r} not understood; use a rule like '2i+1', pairs like '0:1,1:3' "
                "or a mapping"
            )
    elif isinstance(spec, Mapping):
        raw = dict(spec.items())
    elif isinstance(spec, Sequence):
        raw = dict(enumerate(spec))
    else:
        raise ValueError(f"layer map must be a mapping, sequence or string, got {type(spec).__name__}")
    if not raw:
        raise ValueError("layer map is empty; map at least one student layer to a teacher layer")
    layer_map = {
        _index("student layer", s): _index(f"teacher layer for student layer {s}", t) for s, t in raw.items()
    }
    for s, t in layer_map.items():
        if num_student_layers is not None and s >= num_student_layers:
            raise ValueError(
                f"student layer {s} out of range: the student has {num_student_layers} layers "
                f"(valid: 0..{num_student_layers - 1})"
            )
        if num_teacher_layers is not None and t >= num_teacher_layers:
            raise ValueError(
                f"student layer {s} maps to teacher layer {t}, but the teacher has "
                f"{num_teacher_layers} layers (valid: 0..{num_teacher_layers - 1})"
            )
    return dict(sorted(layer_map.items()))


class FeatureProjector(nn.Module):
    """Projects mapped student hidden states to teacher width and scores them against the teacher's.

    loss = weight * sum over counted tokens of mean over mapped layers of l(proj(s), t) / normaliser,
    with l = mean squared error over the teacher width ("mse") or 1 - cosine similarity ("cosine").
    Averaging over layers (and over width for MSE) keeps `weight` meaningful when the map or the widths
    change; the normaliser follows the same global-token contract as DistillationLoss.
    """

    def __init__(
        self,
        layer_map: Mapping[Any, Any] | Sequence[int] | str,
        student_width: int,
        teacher_width: int,
        loss: str = "mse",
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        for name, width in (("student_width", student_width), ("teacher_width", teacher_width)):
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {width!r}")
        if loss not in FEATURE_LOSSES:
            raise ValueError(f"feature loss {loss!r} unknown; expected one of {', '.join(FEATURE_LOSSES)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"feature weight must be a number >= 0, got {weight!r}")
        self.layer_map = parse_layer_map(layer_map)
        self.loss_kind = loss
        self.weight = float(weight)
        self.proj = nn.ModuleDict({str(s): nn.Linear(student_width, teacher_width) for s in self.layer_map})
        if student_width == teacher_width:  # start from "copy the feature" rather than a random rotation
            with torch.no_grad():
                for linear in self.proj.values():
                    linear.weight.copy_(torch.eye(teacher_width))
                    linear.bias.zero_()

    def _token_loss(self, projected: Tensor, target: Tensor) -> Tensor:
        if self.loss_kind == "mse":
            return (projected - target).pow(2).mean(-1)
        return 1.0 - F.cosine_similarity(projected, target, dim=-1, eps=1e-8)

    def forward(
        self,
        student_hidden: Mapping[int, Tensor] | Sequence[Tensor],
        teacher_hidden: Mapping[int, Tensor] | Sequence[Tensor],
        mask: Tensor | None,
        normaliser: float,
    ) -> LossOutput:
        normaliser = check_normaliser(normaliser)
        per_layer: dict[str, Tensor] = {}
        tokens = 0
        for s, t in self.layer_map.items():
            try:
                student, teacher = student_hidden[s], teacher_hidden[t]
            except (KeyError, IndexError) as err:
                raise ValueError(f"layer map {s}->{t}: hidden state missing ({err!r})") from err
            linear = self.proj[str(s)]
            if student.shape[:-1] != teacher.shape[:-1]:
                raise ValueError(
                    f"layer {s}->{t}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                    "must agree on every dim but the width"
                )
            if student.shape[-1] != linear.in_features or teacher.shape[-1] != linear.out_features:
                raise ValueError(
                    f"layer {s}->{t}: widths {student.shape[-1]}->{teacher.shape[-1]} do not match the "
                    "projector "
                    f"({linear.in_features}->{linear.out_features})"
                )
            student = student.reshape(-1, student.shape[-1])
            teacher = teacher.detach().reshape(-1, teacher.shape[-1])
            student, teacher = select_rows(mask, student, teacher)
            tokens = student.shape[0]
            projected = linear(student.to(linear.weight.dtype))
            dtype = torch.promote_types(projected.dtype, torch.float32)  # bf16 in, fp32 loss
            per_layer[f"{s}->{t}"] = self._token_loss(projected.to(dtype), teacher.to(dtype))
        per_token = torch.stack(list(per_layer.values())).mean(0)
        loss = self.weight * per_token.sum() / normaliser
        with torch.no_grad():  # floats, or 0-d tensors inside `metrics_on_device` (no host sync)
            metrics = {"feature_sum": metric_value(per_token.sum()), "tokens": float(tokens)}
            for name, values in per_layer.items():
                metrics[f"feature_sum/{name}"] = metric_value(values.sum())
        return LossOutput(loss=loss, metrics=metrics)
