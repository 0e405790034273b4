"""Capacity plan of a run: `python -m launch.plan [the run's group=option ...] [plan.key=value ...]`.

Composed like `launch.train` (the same teacher, student, trainer, data and stream choices) plus the
hardware it assumes (`plan.*`, conf/plan.yaml). Reads the models' config.json only (no weights), and
prints per token FLOPs, memory per GPU, GPUs per teacher replica, the teacher:student GPU ratio that keeps
the students fed, stream bandwidth and, given `plan.tokens`, hours and GPU-hours; then the same as one
JSON line. Formulas: distill/plan.py and the README's "Capacity plan".
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distill.config import ConfigError, build, register_configs
from distill.plan import describe, model_shape, plan
from launch.errors import reported_errors

register_configs()
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def check(p: DictConfig) -> None:
    """The plan's own inputs, before any model is read."""
    for key in ("gpu_memory_gib", "peak_tflops"):
        if not p[key] > 0:
            raise ConfigError(f"plan.{key}={p[key]} must be > 0.")
    for key in ("usable_fraction", "teacher_mfu", "student_mfu"):
        if not 0 < p[key] <= 1:
            raise ConfigError(f"plan.{key}={p[key]} must be in (0, 1].")
    for key in ("student_gpus", "gpus_per_node"):
        if p[key] < 1:
            raise ConfigError(f"plan.{key}={p[key]} must be >= 1.")
    for key in ("tp_bus_gbs", "network_gbs"):
        if not p[key] > 0:
            raise ConfigError(f"plan.{key}={p[key]} must be > 0.")


def config_folder(node: DictConfig) -> Path:
    """The folder whose config.json describes a model: a local `name_or_path` folder is read as it is (its
    weights need not be there: a plan for a model not downloaded yet); anything else is built as a run
    builds it (builtin names, students cut from the teacher)."""
    path = node.get("name_or_path")
    if path is not None and (Path(str(path)).expanduser() / "config.json").is_file():
        return Path(str(path)).expanduser()
    return Path(build(node))


def make_plan(cfg: DictConfig) -> dict:
    check(cfg.plan)
    teacher = model_shape(config_folder(cfg.teacher.model))
    student = model_shape(config_folder(cfg.student.model))
    t, p = cfg.trainer, cfg.plan
    return plan(
        teacher,
        student,
        seq_len=cfg.data.seq_len,
        micro_batch=t.micro_batch_size,
        teacher_dtype="bfloat16" if cfg.teacher.dtype == "auto" else cfg.teacher.dtype,
        precision=t.precision,
        zero_stage=t.zero_stage,
        student_gpus=p.student_gpus,
        gradient_checkpointing=cfg.student.gradient_checkpointing,
        loss_chunk=cfg.loss.chunk_size,
        topk=cfg.stream.topk,
        values_dtype=cfg.stream.values_dtype,
        codec=cfg.stream.codec,
        gpu_memory_gib=p.gpu_memory_gib,
        gpus_per_node=p.gpus_per_node,
        tp_bus_gbs=p.tp_bus_gbs,
        network_gbs=p.network_gbs,
        usable_fraction=p.usable_fraction,
        peak_tflops=p.peak_tflops,
        teacher_mfu=p.teacher_mfu,
        student_mfu=p.student_mfu,
        teacher_tokens_per_s_per_gpu=p.teacher_tokens_per_s_per_gpu,
        student_tokens_per_s_per_gpu=p.student_tokens_per_s_per_gpu,
        tokens=p.tokens,
    )


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="plan", version_base="1.3")
@reported_errors  # bad input: one `error: ...` line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> dict:
    result = make_plan(cfg)
    print(describe(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
