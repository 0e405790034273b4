"""Distillation losses: sparse top-k KD divergences, the fused chunked lm_head loss, feature distillation.

Split into modules so each reads top to bottom: `divergences` (the formulas, dense and sparse),
`schedule` (step ramps), `kd` (DistillationLoss and the fused chunked path), `features` (hidden-state KD).
"""

from .divergences import DIVERGENCES, LOG_ZERO, TAILS, dense_divergence, log1mexp, sparse_divergence
from .features import FEATURE_LOSSES, FeatureProjector, parse_layer_map
from .kd import (
    IGNORE_INDEX,
    DistillationLoss,
    LossOutput,
    check_teacher_indices,
    metrics_on_device,
    select_rows,
)
from .schedule import SCHEDULABLE, SCHEDULE_KINDS, parse_schedule

__all__ = [
    "DIVERGENCES",
    "FEATURE_LOSSES",
    "IGNORE_INDEX",
    "LOG_ZERO",
    "SCHEDULABLE",
    "SCHEDULE_KINDS",
    "TAILS",
    "DistillationLoss",
    "FeatureProjector",
    "LossOutput",
    "check_teacher_indices",
    "dense_divergence",
    "log1mexp",
    "metrics_on_device",
    "parse_layer_map",
    "parse_schedule",
    "select_rows",
    "sparse_divergence",
]
