"""Tensor parallelism inside a teacher pipeline stage (`teacher.tensor_parallel: N`).

A stage becomes a group of N processes (Ray actors, one per GPU, on one node) that each hold 1/N of the
stage's decoder layers and run every forward together. The sharding is the model's own tensor-parallel plan
(`base_model_tp_plan` in its transformers config; for Llama-layout models q/k/v and gate/up "colwise", o and
down "rowwise") applied by transformers' own engine, `transformers.distributed.tensor_parallel`
(`apply_tensor_parallelism`): each planned weight becomes a torch DTensor sharded over a `DeviceMesh` of the
group, and each planned module's forward runs on its local shard, a "rowwise" one followed by an
all-reduce over the group. Every process reads only its own slice of each sharded tensor from the
safetensors files (`safe_open(...).get_slice`, sliced by transformers' `DtensorShardOperation`, the
shard-on-read that `from_pretrained(tp_plan=...)` uses). Embeddings, norms and the LM head stay whole
(replicated) on the stages that hold them.

Why this engine: it is the model's own plan, so every architecture transformers ships a plan for is
sharded the way its authors intended (GQA heads, fused projections, biases); it runs with gloo on CPU
and NCCL on GPU alike (the CPU tests exercise the same code path as a GPU run); and it works on the
layer modules the stages already build, so pipeline stages and tensor parallelism compose.
DeepSpeed's AutoTP (`deepspeed.init_inference`) wants the whole model in each process before it shards,
the opposite of a stage that reads only its own tensors, and hand-written Megatron layers would
duplicate what transformers already maintains per architecture.

This module is Ray-free (config checks run in drivers that never import Ray); the Ray side (the group of
actors, who sends what to whom) is in `distill/teacher/pipeline.py`.
"""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

# How long a collective (and the group's rendezvous) may wait for the other ranks before it fails. Loading
# happens before the group's closing barrier, so a rank that reads its shard slowly is waited for.
GROUP_TIMEOUT_S = 1800


def tensor_parallel_problem(
    config: dict, tensor_parallel: int, stages: int = 1, gpus_per_replica: float = 0.0
) -> str | None:
    """Why `tensor_parallel` cannot shard the model of `config` (its config.json as a dict), or None.

    Each rank takes 1/N of the attention heads, of the key/value heads (GQA: whole groups) and of the MLP
    channels, so all three must divide by N. On GPUs each rank is one process on one whole GPU of its own
    (NCCL refuses two ranks on one device; a rank spread over several GPUs would need a mesh per GPU), so a
    replica's GPUs must be exactly stages x tensor_parallel, or 0 (CPU: gloo)."""
    if tensor_parallel < 1:
        return f"tensor_parallel={tensor_parallel} must be >= 1 (1 = no tensor parallelism)."
    if tensor_parallel == 1:
        return None
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    channels = int(config.get("intermediate_size") or 0)  # 0 (absent): not checked here
    sizes = {"attention heads": heads, "key/value heads": kv_heads, "MLP channels": channels}
    bad = [f"{n} {what}" for what, n in sizes.items() if n % tensor_parallel]
    if bad:
        common = math.gcd(heads, kv_heads, channels)
        fits = [str(d) for d in range(1, common + 1) if common % d == 0]
        return (
            f"tensor_parallel={tensor_parallel} does not divide the teacher's {', '.join(bad)}: each rank "
            f"takes an equal share of its {heads} attention heads, {kv_heads} key/value heads and "
            f"{channels} MLP channels. Use a tensor_parallel that divides all three ({', '.join(fits)}), "
            f"or scale with stages / replicas instead."
        )
    expected = stages * tensor_parallel
    if gpus_per_replica and abs(gpus_per_replica - expected) > 1e-9:
        return (
            f"tensor_parallel={tensor_parallel} with stages={stages} runs {expected} processes per replica, "
            f"each on one whole GPU of its own, but gpus_per_replica={gpus_per_replica:g}; set "
            f"gpus_per_replica={expected} (or 0: CPU)."
        )
    return None


def check_tensor_parallel(
    config: dict, tensor_parallel: int, stages: int = 1, gpus_per_replica: float = 0.0
) -> None:
    """`tensor_parallel_problem` as a ValueError (raised before any actor starts)."""
    if problem := tensor_parallel_problem(config, tensor_parallel, stages, gpus_per_replica):
        raise ValueError(f"teacher.{problem}")


def check_teacher_config(key: str, tc, model_dir: str | Path) -> None:
    """The drivers' check (train, cache, generate), before data or models load: `tc` (a `teacher` config
    node, named `key`: "teacher" or "teachers.<name>") must shard the model in `model_dir`; ConfigError."""
    from distill.config import ConfigError

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if problem := tensor_parallel_problem(config, tc.tensor_parallel, tc.stages, tc.gpus_per_replica):
        raise ConfigError(f"{key}.{problem}")


class Rendezvous:
    """Rank 0's side of a group's rendezvous: a `torch.distributed.TCPStore` on a free port of this node,
    opened before the others are told where it is (so no other process can take the port in between)."""

    def __init__(self, world_size: int):
        import ray

        self.host = ray.util.get_node_ip_address()
        self.store = torch.distributed.TCPStore(
            self.host,
            0,  # any free port; the store reports which
            world_size,
            is_master=True,
            timeout=timedelta(seconds=GROUP_TIMEOUT_S),
            wait_for_workers=False,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.store.port}"


def init_group(address: str, rank: int, size: int, device: torch.device, store=None):
    """Join this process to its stage's group (the process's default torch.distributed group: one group per
    process, one process per rank) and return the group's 1-D DeviceMesh. gloo on CPU, NCCL on GPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if store is None:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(
            host, int(port), size, is_master=False, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
        )
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    return DeviceMesh(device.type, list(range(size)))


def agree_loaded(error: BaseException | None) -> None:
    """The group's closing step of loading: every rank says whether it loaded its shard (one collective that
    every rank reaches, failed or not, so none waits for a rank that gave up), and every rank raises if any
    failed, with the failed ranks' own messages."""
    from distill.dist import gather_messages

    messages = gather_messages(None if error is None else f"{type(error).__name__}: {error}")
    failed = {r: m for r, m in enumerate(messages) if m is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        raise RuntimeError(f"tensor-parallel rank(s) {sorted(failed)} of this stage failed to load: {detail}")


def layer_plan(model: torch.nn.Module, layers: range) -> dict[str, str]:
    """The model's tensor-parallel plan, restricted to decoder layers `layers` and spelled out per module and
    per parameter (the form `apply_tensor_parallelism` takes): {module: style} installs the style's forward,
    {module.param: style} shards the parameter. Rules for the embeddings and the LM head are left out: they
    stay whole on the stages that hold them. Raises when the model has no plan."""
    rules = getattr(model, "_tp_plan", None) or {
        f"model.{k}": v for k, v in (getattr(model.config, "base_model_tp_plan", None) or {}).items()
    }
    rules = {k: v for k, v in rules.items() if k.startswith("model.layers.*.")}
    if not rules:
        raise ValueError(
            f"{type(model).__name__} has no tensor-parallel plan for its decoder layers (config "
            f"`base_model_tp_plan`), so teacher.tensor_parallel > 1 cannot shard it; use stages / replicas."
        )
    patterns = [(re.compile(re.escape(k).replace(r"\*", r"\d+") + r"$"), v) for k, v in rules.items()]
    wanted = tuple(f"model.layers.{i}." for i in layers)
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name.startswith(wanted):
            continue
        for pattern, style in patterns:
            if pattern.match(name):
                plan[name] = style
                plan.update({f"{name}.{p}": style for p, _ in module.named_parameters(recurse=False)})
    for name, _ in model.named_parameters():  # rules that name a parameter itself (e.g. attention sinks)
        if name.startswith(wanted) and any(pattern.match(name) for pattern, _ in patterns):
            plan[name] = next(style for pattern, style in patterns if pattern.match(name))
    return plan


def shard(model: torch.nn.Module, mesh, plan: dict[str, str]) -> dict[str, Any]:
    """Apply `plan` to the (meta-device) `model` with transformers' engine; returns {parameter name: its
    DTensor placeholder} of every parameter that is now sharded (the rest stay whole)."""
    try:
        from torch.distributed.tensor import DTensor
        from transformers.distributed.tensor_parallel import apply_tensor_parallelism
    except ImportError as e:  # transformers without its DTensor tensor-parallel engine
        import transformers

        raise ImportError(
            f"teacher.tensor_parallel > 1 needs transformers' DTensor tensor-parallel engine "
            f"(transformers.distributed.tensor_parallel); transformers {transformers.__version__} has none."
        ) from e
    apply_tensor_parallelism(model, mesh, plan)
    return {n: p for n, p in model.named_parameters() if isinstance(p, DTensor)}


def whole_rows(placeholder) -> bool:
    """Whether a rank's shard of `placeholder` is a block of whole rows (sharded on dim 0, or not at all):
    contiguous in a row-major file, so reading it touches only its own bytes."""
    return all(not p.is_shard() or p.dim % placeholder.ndim == 0 for p in placeholder.placements)


def read_shard(handle, name: str, placeholder, device: torch.device, dtype: torch.dtype, copy: bool = False):
    """This rank's shard of tensor `name`, read from an open safetensors file (`handle`: `safe_open`) as
    the slice the DTensor `placeholder` says this rank owns, wrapped as a DTensor like the placeholder.
    The shard may be a view of the file's memory map; `copy`: always a tensor of its own (so the handle's
    mapping can go)."""
    from torch.distributed.tensor import DTensor
    from transformers.distributed.sharding_utils import DtensorShardOperation

    source = handle.get_slice(name)  # nothing read yet
    local = DtensorShardOperation(placeholder).shard_tensor(source, device=device, dtype=dtype)
    local = local.clone(memory_format=torch.contiguous_format) if copy else local.contiguous()
    return DTensor.from_local(
        local,
        placeholder.device_mesh,
        placeholder.placements,
        run_check=False,
        shape=placeholder.shape,
        stride=tuple(placeholder.stride()),
    )


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
