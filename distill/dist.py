"""Collectives and host-to-device copies of the student ranks, in one place.

Under NCCL every tensor a collective touches must live on the rank's GPU (a CPU tensor is an error), and
every `.item()` / `.tolist()` of a GPU tensor makes the host wait for the device. So the rank loop and
evaluation reduce through these helpers only (tests/test_dist.py checks that no other module calls a
`torch.distributed` collective directly):

- `sum_over_ranks(values, device)`: values that live on the device (loss sums, eval sums) or on the host,
  packed into ONE float64 tensor on `device`, all-reduced there; the caller reads it once (one host sync).
- `host_sum(values)`: host-side counters (token counts from numpy masks, failure and preemption flags)
  through a gloo group, so agreeing on them never waits for the GPU. With a gloo world that group is the
  world itself; under NCCL it is a gloo side group made once per process (`init_host_group`, collective).
- `to_device(tensor, device)`: CUDA copies go through pinned memory and do not block the host; on CPU the
  tensor is returned as it is.
- `gather_messages(message)`: every rank's short text (or None) over the default group, for agreeing on
  a failure once (a teacher's tensor-parallel group after loading its shards).

Not yet run on a GPU: the CUDA branches are written to PyTorch's documented semantics and run here only
with CPU tensors (gloo) and the meta device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_HOST_GROUP: dict[str, object] = {}  # "group": the gloo group for host-side counters (None = the world)


def _world_is_gloo() -> bool:
    return dist.get_backend() == dist.Backend.GLOO


def init_host_group() -> None:
    """Create the gloo side group for host-side counters. Collective: every rank calls it at the same
    point (right after joining the process group), before the first `host_sum`."""
    if "group" in _HOST_GROUP or not dist.is_initialized():
        return
    _HOST_GROUP["group"] = None if _world_is_gloo() else dist.new_group(backend="gloo")


def host_group():
    """The process group host-side (CPU) tensors are reduced in: the world under gloo, else a gloo group."""
    if "group" not in _HOST_GROUP:
        if dist.is_initialized() and not _world_is_gloo():
            raise RuntimeError("init_host_group() must run on every rank before the first host_sum()")
        return None
    return _HOST_GROUP["group"]


def host_sum(values: Sequence[float]) -> list[float]:
    """Σ over ranks of host-side numbers (floats, ints, bools), in float64 on the CPU; this rank's own
    values when no process group is initialised. Never touches a GPU."""
    summed = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(summed, group=host_group())
    return summed.tolist()


def gather_messages(message: str | None) -> list[str | None]:
    """Every rank's `message`, in rank order, over the default group (torch's object all-gather: under
    NCCL it travels on the current CUDA device, which the caller has set)."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return messages


def pack(values: Sequence[float | torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """`values` as one float64 vector on `device`, in order: host numbers travel in one copy, tensors
    (0-d or 1-element, on any device) are cast and moved on the device. No host sync for device tensors."""
    device = torch.device(device)
    host = torch.tensor([0.0 if torch.is_tensor(v) else float(v) for v in values], dtype=torch.float64)
    packed = to_device(host, device)
    on_device = [i for i, v in enumerate(values) if torch.is_tensor(v)]
    if on_device:
        parts = [values[i].detach().reshape(()).to(device=device, dtype=torch.float64) for i in on_device]
        packed[torch.tensor(on_device, device=device)] = torch.stack(parts)
    return packed


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `tensor`, in place and returned; it must live on the world backend's device (the
    rank's GPU under NCCL: the engine's device). Unchanged when no process group is initialised."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def sum_over_ranks(values: Sequence[float | torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Σ over ranks of `values` (`pack`), reduced on `device`: the world backend's device (the engine's
    device; CUDA under NCCL). Returns the float64 vector on `device`; read it with ONE `.tolist()`."""
    return reduce_sum(pack(values, device))


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`: to CUDA through pinned memory without blocking the host (the copy is ordered
    on the current stream before any kernel that reads it); elsewhere a plain `.to` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
