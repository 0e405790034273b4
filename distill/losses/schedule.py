"""Step schedules for the loss knobs (kd_weight, ce_weight, temperature).

A schedule is a mapping ``{"kd_weight": {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 1000}, ...}``.
Kinds: ``constant`` (``value``, or ``start``), ``linear`` and ``cosine`` (``start`` -> ``end`` over
``steps`` optimizer steps, then held at ``end``). Validated up front so a typo fails at construction, not
thousands of steps in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEDULABLE = ("kd_weight", "ce_weight", "temperature")
SCHEDULE_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Ramp:
    kind: str
    start: float
    end: float
    steps: int

    def at(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        frac = min(max(step, 0) / self.steps, 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"schedule.{name}.{key} must be a finite number, got {value!r}")
    return float(value)


def _check_range(name: str, key: str, value: float) -> None:
    if name == "temperature" and value <= 0:
        raise ValueError(f"schedule.temperature.{key} must be > 0, got {value!r}")
    if name != "temperature" and value < 0:
        raise ValueError(f"schedule.{name}.{key} must be >= 0, got {value!r}")


def parse_schedule(schedule: Mapping[str, Any] | None) -> dict[str, Ramp]:
    """Validate a schedule mapping (plain dict or OmegaConf DictConfig) into Ramps."""
    if schedule is None:
        return {}
    if not isinstance(schedule, Mapping):
        raise ValueError(
            f"schedule must be a mapping like {{'kd_weight': {{...}}}} or None, got {schedule!r}"
        )
    ramps: dict[str, Ramp] = {}
    for name, spec in schedule.items():
        if name not in SCHEDULABLE:
            raise ValueError(
                f"schedule key {name!r} is not schedulable; expected one of {', '.join(SCHEDULABLE)}"
            )
        if not isinstance(spec, Mapping):
            raise ValueError(f"schedule.{name} must be a mapping with 'kind', got {spec!r}")
        kind = spec.get("kind", "linear")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"schedule.{name}.kind {kind!r} unknown; expected one of {', '.join(SCHEDULE_KINDS)}"
            )
        allowed = {"kind", "value", "start"} if kind == "constant" else {"kind", "start", "end", "steps"}
        extra = set(spec) - allowed
        if extra:
            raise ValueError(
                f"schedule.{name} ({kind}) has unknown keys {sorted(extra)}; allowed {sorted(allowed)}"
            )
        if kind == "constant":
            key = "value" if "value" in spec else "start"
            if key not in spec:
                raise ValueError(f"schedule.{name} (constant) needs 'value'")
            value = _number(name, key, spec[key])
            _check_range(name, key, value)
            ramps[name] = Ramp("constant", value, value, 1)
            continue
        missing = [key for key in ("start", "end", "steps") if key not in spec]
        if missing:
            raise ValueError(f"schedule.{name} ({kind}) is missing {missing}")
        start, end = _number(name, "start", spec["start"]), _number(name, "end", spec["end"])
        for key, value in (("start", start), ("end", end)):
            _check_range(name, key, value)
        steps = spec["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"schedule.{name}.steps must be an integer >= 1, got {steps!r}")
        ramps[name] = Ramp(kind, start, end, steps)
    return ramps
