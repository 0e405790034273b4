"""Which GPUs of this machine the teachers get and which the student ranks get, for a local run.

`python -m launch.train` on one node starts both the Ray teacher pool and the student ranks; without a
split both would see every GPU and the teachers' first GPU would be a student's. `split_gpus` is the pure
rule the driver applies before any model loads:

- the teachers get the first ceil(Σ replicas × gpus_per_replica) visible GPUs (fractional shares pack
  onto whole GPUs) and the local Ray runtime is started with exactly those (`CUDA_VISIBLE_DEVICES` and
  `num_gpus`), so Ray hands each replica and stage its own share;
- the student ranks get `trainer.gpus` of the others (None: one per rank from those the teachers do not
  take, or none when none are left; 0: CPU), one GPU per rank, through the ranks' `CUDA_VISIBLE_DEVICES`.

A Ray cluster given by `ray.address` places its teachers on its own nodes: then no local GPU is reserved
for them. On a machine without GPUs the split is empty and nothing changes. Not yet run on a GPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distill.config import ConfigError


@dataclass(frozen=True)
class GpuSplit:
    """Device ids (as `CUDA_VISIBLE_DEVICES` names them) for the teacher pool and for the student ranks."""

    teachers: tuple[str, ...]
    students: tuple[str, ...]

    @staticmethod
    def visible(ids: Sequence[str]) -> str:
        """The `CUDA_VISIBLE_DEVICES` value for `ids` ("" hides every GPU)."""
        return ",".join(ids)


def visible_gpus(env: Mapping[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The GPU ids this process may use: `CUDA_VISIBLE_DEVICES` when set, else 0..device_count-1 (torch's
    count, which reads the driver without creating a CUDA context)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


def teacher_gpu_demand(teachers: Mapping[str, object]) -> float:
    """Σ over the named teacher configs of replicas × gpus_per_replica (what the pool asks Ray for)."""
    return sum(float(tc.replicas) * float(tc.gpus_per_replica) for tc in teachers.values())


def split_gpus(
    visible: Sequence[str], teacher_gpus: float, student_gpus: int | None, num_ranks: int
) -> GpuSplit:
    """Disjoint GPU sets for the teachers (`teacher_gpus`, possibly fractional) and the `num_ranks` student
    ranks (`student_gpus`: None = one per rank from those left, or CPU when none are left; 0 = CPU; else
    exactly one per rank). ConfigError when the machine has too few GPUs for what is asked."""
    if teacher_gpus < 0 or (student_gpus is not None and student_gpus < 0):
        raise ConfigError(f"GPU counts must be >= 0 (teachers {teacher_gpus:g}, trainer.gpus={student_gpus})")
    need = math.ceil(teacher_gpus - 1e-9)
    if need > len(visible):
        raise ConfigError(
            f"the teachers need {teacher_gpus:g} GPUs (replicas x gpus_per_replica) but this machine has "
            f"{len(visible)} visible ({GpuSplit.visible(visible) or 'none'}): lower gpus_per_replica or "
            f"replicas."
        )
    teachers, rest = tuple(visible[:need]), tuple(visible[need:])
    if student_gpus is None:  # default: one GPU per rank from those the teachers do not take, if any are left
        student_gpus = 0 if not rest else num_ranks
    if student_gpus and student_gpus != num_ranks:
        raise ConfigError(
            f"trainer.gpus={student_gpus} but trainer.num_ranks={num_ranks}: each student rank takes one GPU "
            f"(NCCL refuses two ranks on one device); set trainer.gpus={num_ranks}, or 0 to train on CPU."
        )
    if student_gpus > len(rest):
        raise ConfigError(
            f"the {num_ranks} student ranks need {student_gpus} GPUs besides the teachers' {need} "
            f"({GpuSplit.visible(teachers) or 'none'}), but this machine has {len(visible)} visible: lower "
            f"trainer.num_ranks, the teachers' GPUs, or set trainer.gpus=0 to train on CPU."
        )
    return GpuSplit(teachers, rest[:student_gpus])


def ray_gpu_options(num_gpus: float) -> dict:
    """Ray actor options that state an actor's GPUs: `num_gpus` (Ray then sets the actor's
    `CUDA_VISIBLE_DEVICES` to its share), and for an actor given none on a cluster that has GPUs an empty
    `CUDA_VISIBLE_DEVICES`, so it runs on CPU instead of (depending on the Ray version) seeing every GPU and
    taking the first, possibly a student's. On a cluster without GPUs: `num_gpus` alone, as before."""
    import ray

    options: dict = {"num_gpus": num_gpus}
    if not num_gpus and ray.cluster_resources().get("GPU", 0) > 0:
        options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    return options
