"""A run directory belongs to one run: a start is checked against what the directory already holds.

- `config.yaml` is the first start's resolved config, the run's record; it is never rewritten.
- A later start (a resume, or a restart before the first checkpoint) is compared with the run's current
  config: the newest `config-history/start-<n>.yaml`, else `config.yaml`. Changes that alter what is trained
  (data, models, loss, features, batch geometry, schedule, seeds, precision, ...) are refused, naming each
  key with its recorded and new value. Run-time settings (logging, Ray, teacher replicas/threads/stages,
  prefetch, checkpoint/eval/log intervals, `trainer.stop_at_step`, ...) may change freely, and two changes
  are safe when asked for explicitly with `trainer.allow_changes` (config.RESUME_CHANGES):
    * `trainer.max_steps`, longer only. Rule: the warmup + cosine LR schedule is recomputed for the new
      max_steps; the first resumed step uses the learning rate the checkpoint was saved with, every later
      step the new schedule's (the same curve a run planned that long from the start has at that step).
    * the batch split (`trainer.num_ranks`, `micro_batch_size`, `grad_accum_steps`) with an unchanged global
      batch micro_batch_size x grad_accum_steps x num_ranks: the step sampler draws each step's global batch
      as a function of (seed, step, global batch size) alone and only deals it out differently, and the
      loss is normalised by the counted tokens of the whole global batch, so the update is the same. The
      rank count may change only with `trainer.zero_stage=0`: DeepSpeed cannot re-partition ZeRO-1/2/3
      optimizer state saved by another number of ranks.
  A start whose config differs writes it to `config-history/start-<n>.yaml` (the ranks read the newest);
  every later start appends a line to `resumes.jsonl` (time, checkpoint, changes).
- A fresh start (`trainer.resume=off`, or no checkpoint to resume) where another start left checkpoints or
  outputs (metrics, summary, export) is refused with the choices: resume that run, or pick a new run_dir.
- When a run resumes from step N, its earlier export (`student/`) and `summary.json` are renamed to
  `student-step-N/` and `summary-step-N.json` before the ranks write new ones.

Nothing in the directory changes before the whole start has been checked (`check_start` only reads;
`record_start` writes, at the end of `prepare`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distill.config import RESUME_CHANGES, ConfigError, DistillConfig

RECORD = "config.yaml"
HISTORY = "config-history"
RESUMES = "resumes.jsonl"
# What a start leaves behind besides checkpoints; a fresh start never writes over them.
OUTPUTS = ("metrics.jsonl", "summary.json", "student", "curriculum.json")
BATCH_SPLIT = ("trainer.num_ranks", "trainer.micro_batch_size", "trainer.grad_accum_steps")

# Keys (and key prefixes) that do not change what is trained: where and how fast it runs, what is logged.
FREE_KEYS = (
    "run_dir",
    "launch",
    "logger",
    "ray",
    "trainer.resume",
    "trainer.stop_at_step",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.threads_per_rank",
    "trainer.dist_backend",
    "trainer.gpus",
    "trainer.record_samples",
    "trainer.allow_changes",
    "trainer.fused_loss",
    "student.gradient_checkpointing",
    "student.attn_implementation",
    "stream.prefetch",
    "stream.timeout_s",
    "stream.max_wait_s",
    "data.tokenize_workers",
    "cache.values_dtype",
    "cache.hidden_layers",
    "cache.shard_sequences",
    "cache.batch_size",
    "cache.from_generation",
)
# Teacher keys that only place or size the teacher service (in `teacher.` and in each `teachers.<name>.`).
TEACHER_RUNTIME = (
    "replicas",
    "cpus_per_replica",
    "gpus_per_replica",
    "threads",
    "stages",
    "tensor_parallel",
    "placement_strategy",
    "max_restarts",
    "attach",
    "attn_implementation",
)
_ABSENT = "<absent>"
ALLOWED_HELP = (
    "May change when a run continues: run-time settings (logger, ray, teacher replicas / threads / stages / "
    "tensor_parallel / CPUs / GPUs, stream.prefetch, checkpoint / eval / log intervals, "
    "trainer.stop_at_step) freely; with trainer.allow_changes=[...] also trainer.max_steps (longer only; "
    "the LR schedule follows the new length) and the batch split micro_batch_size / grad_accum_steps "
    "(num_ranks too with ZeRO-0) at the same global batch. See README, 'Resuming with changed settings'."
)


class RunDirError(ConfigError):
    """A start that would overwrite or mix with another run in the same run directory."""


@dataclass
class Start:
    """What `check_start` found: the config this start was compared with and what changed."""

    run_dir: Path
    resume_from: Path | None
    recorded: Path | None = None  # the run's current config file, None on a first start
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (recorded, new)


def effective_config_path(run_dir: str | Path) -> Path:
    """The run's current config: the newest `config-history/start-<n>.yaml`, else `config.yaml`."""
    run_dir = Path(run_dir)
    history = sorted((run_dir / HISTORY).glob("start-*.yaml"))
    return history[-1] if history else run_dir / RECORD


def _resolved(conf: DictConfig) -> dict:
    """A config as plain data, over the schema's defaults (keys added to the schema since it was recorded
    compare as their defaults)."""
    try:
        conf = OmegaConf.merge(OmegaConf.structured(DistillConfig), conf)
    except Exception:  # a key the schema no longer has: compare the recorded file as it is
        pass
    return OmegaConf.to_container(conf, resolve=True)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; lists are leaves (compared whole)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def is_free(key: str) -> bool:
    """Whether changing `key` leaves what is trained unchanged (FREE_KEYS, TEACHER_RUNTIME)."""
    if any(_matches(key, p) for p in FREE_KEYS):
        return True
    parts = key.split(".")
    return (parts[0] == "teacher" and len(parts) == 2 and parts[1] in TEACHER_RUNTIME) or (
        parts[0] == "teachers" and len(parts) == 3 and parts[2] in TEACHER_RUNTIME
    )


def _outputs(run_dir: Path) -> list[str]:
    """What earlier starts left in `run_dir`: its newest checkpoint first (if any), then OUTPUTS present."""
    from distill.student.checkpoint import list_checkpoints

    found = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    older = f" (and {len(found) - 1} older)" if len(found) > 1 else ""
    ckpts = [f"checkpoints/{found[-1]}{older}"] if found else []
    return ckpts + [name for name in OUTPUTS if (run_dir / name).exists()]


def _change(key: str, old: Any, new: Any) -> str:
    return f"{key} {old!r} -> {new!r}"


def check_start(cfg: DictConfig, run_dir: str | Path, resume_from: Path | None) -> Start:
    """Refuse a start that would overwrite or mix with another run in `run_dir` (RunDirError naming the
    files or keys and the choices), reading only; returns what `record_start` records once every other
    check of the start has passed."""
    run_dir = Path(run_dir)
    mode = str(cfg.trainer.resume)
    outputs = _outputs(run_dir)
    path = effective_config_path(run_dir)
    if resume_from is None and outputs and mode == "off":
        has_checkpoint = outputs[0].startswith("checkpoints/") or "curriculum.json" in outputs
        again = (
            f"continue it with trainer.resume=latest (its settings are in {path})"
            if has_checkpoint
            else "start it again from scratch in place with trainer.resume=auto (it has no checkpoint yet; "
            "metrics.jsonl is appended to)"
        )
        raise RunDirError(
            f"run_dir {run_dir} already holds a run ({', '.join(outputs)}), and trainer.resume=off would "
            f"start another one over it. Either {again}, or start a new run with another run_dir=... "
            f"Nothing in {run_dir} was changed."
        )
    start = Start(run_dir, resume_from)
    if not path.is_file():
        return start
    old = _flatten(_resolved(OmegaConf.load(path)))
    new = _flatten(_resolved(cfg))
    start.recorded = path
    start.changes = {
        k: (old.get(k, _ABSENT), new.get(k, _ABSENT))
        for k in sorted(old.keys() | new.keys())
        if old.get(k, _ABSENT) != new.get(k, _ABSENT)
    }
    _check_changes(start, cfg)
    return start


def _check_changes(start: Start, cfg: DictConfig) -> None:
    """The rules of the module docstring, applied to `start.changes`; raises RunDirError."""
    changes, allowed = start.changes, set(cfg.trainer.allow_changes or ())
    what = (
        f"resuming {start.resume_from}" if start.resume_from else f"starting again in {start.run_dir}"
    ) + f", whose run is recorded in {start.recorded}"
    refused = [_change(k, *changes[k]) for k in changes if not is_free(k) and k not in RESUME_CHANGES]
    if refused:
        raise RunDirError(
            f"{what}: these changes would alter what is trained: {'; '.join(refused)}. Rerun with the "
            f"recorded settings, or start a new run with another run_dir=... {ALLOWED_HELP}"
        )
    unasked = [k for k in changes if k in RESUME_CHANGES and k not in allowed]
    if unasked:
        listed = ", ".join(_change(k, *changes[k]) for k in unasked)
        raise RunDirError(
            f"{what}: {listed} changes the run's schedule or batch split; if that is intended, add "
            f"trainer.allow_changes=[{','.join(unasked)}] (or restore the recorded value). {ALLOWED_HELP}"
        )
    if "trainer.max_steps" in changes:
        old, new = changes["trainer.max_steps"]
        if new < old:
            raise RunDirError(
                f"{what}: trainer.max_steps can only grow when a run continues (recorded {old}, now "
                f"{new}); to end this job earlier use trainer.stop_at_step={new} (the schedule still spans "
                f"{old} steps)."
            )
    split = [k for k in BATCH_SPLIT if k in changes]
    if "trainer.num_ranks" in changes and cfg.trainer.zero_stage != 0:
        old, new = changes["trainer.num_ranks"]
        raise RunDirError(
            f"{what}: trainer.num_ranks {old} -> {new}: DeepSpeed cannot load ZeRO-{cfg.trainer.zero_stage} "
            f"optimizer partitions saved by {old} ranks into {new}; keep trainer.num_ranks={old} (the split "
            f"of the global batch over micro_batch_size and grad_accum_steps may change), or start a new run "
            f"with another run_dir=... (with trainer.zero_stage=0 the rank count may change too)."
        )
    if split:
        new = {k: cfg.trainer[k.split(".")[1]] for k in BATCH_SPLIT}
        old_global = math.prod(changes[k][0] if k in changes else new[k] for k in BATCH_SPLIT)
        new_global = math.prod(new.values())
        if old_global != new_global:
            listed = ", ".join(_change(k, *changes[k]) for k in split)
            raise RunDirError(
                f"{what}: {listed} changes the global batch from {old_global} to {new_global} sequences "
                f"(micro_batch_size x grad_accum_steps x num_ranks), which changes what every step trains; "
                f"keep the product at {old_global} or start a new run with another run_dir=..."
            )


def _write_new(path: Path, text: str) -> None:
    """Write a file that must not exist yet, atomically (temporary name, then rename)."""
    if path.exists():
        raise RunDirError(f"{path} exists already; it is never rewritten (remove it by hand if it is stray).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _archive(path: Path, step: int) -> str | None:
    """Rename `student/` or `summary.json` to `student-step-N/` or `summary-step-N.json` (never over an
    existing one); returns the new name, or None when there is nothing to keep."""
    if not path.exists():
        return None
    stem, suffix = (path.stem, path.suffix) if path.is_file() else (path.name, "")
    target, n = path.with_name(f"{stem}-step-{step:06d}{suffix}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{stem}-step-{step:06d}.{n}{suffix}")
    path.rename(target)
    return target.name


def record_start(start: Start, cfg: DictConfig) -> None:
    """Record a checked start: the first writes `config.yaml`; a later one writes its config to
    `config-history/start-<n>.yaml` when it differs, keeps an earlier export and summary when it resumes
    from a checkpoint, and appends a line to `resumes.jsonl`."""
    run_dir = start.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if start.recorded is None:
        _write_new(run_dir / RECORD, text)
        return
    config = start.recorded
    if start.changes:
        number = len(list((run_dir / HISTORY).glob("start-*.yaml"))) + 1
        config = run_dir / HISTORY / f"start-{number:04d}.yaml"
        _write_new(config, text)
    kept = {}
    if start.resume_from is not None:
        step = int(start.resume_from.name.split("-")[-1])
        kept = {name: new for name in ("student", "summary.json") if (new := _archive(run_dir / name, step))}
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resume": str(cfg.trainer.resume),
        "resume_from": str(start.resume_from) if start.resume_from else None,
        "config": str(config.relative_to(run_dir)),
        "changes": {k: [old, new] for k, (old, new) in start.changes.items()},
        "kept": kept,
    }
    with open(run_dir / RESUMES, "a") as f:
        f.write(json.dumps(line) + "\n")
