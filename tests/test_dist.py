"""The ranks' collectives and copies (distill/dist.py), the Ray-free student side and the GPU split.

Fast (seconds): a real 2-process gloo group, the meta device for placement, AST scans of the sources,
one subprocess import. Nothing here needs a GPU; what only a GPU can show is not claimed (README).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.config import ConfigError
from distill.dist import host_sum, pack, sum_over_ranks, to_device
from distill.eval import eval_dtype
from distill.placement import split_gpus, visible_gpus
from distill.stream.client import TeacherStreamError

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "gather",
    "scatter",
}


def test_no_collective_outside_the_helper():
    """Every collective of the library and the entry points goes through distill/dist.py, whose helpers
    take the device to reduce on: a direct `dist.all_reduce(cpu_tensor)` (an error under NCCL) fails this."""
    offenders = []
    for path in sorted([*(ROOT / "distill").rglob("*.py"), *(ROOT / "launch").rglob("*.py")]):
        if path == ROOT / "distill" / "dist.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                base = node.func.value
                if node.func.attr in COLLECTIVES and isinstance(base, ast.Name) and base.id == "dist":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} dist.{node.func.attr}")
    assert not offenders, offenders


def test_pack_puts_host_numbers_and_tensors_on_the_given_device():
    values = [1.5, torch.tensor(2.0, dtype=torch.float32), 3, torch.tensor([4], dtype=torch.int64), True]
    on_meta = pack(values, "meta")
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float64 and on_meta.shape == (5,)
    assert sum_over_ranks(values, "meta").device.type == "meta"  # no process group: reduced in place
    assert pack(values, "cpu").tolist() == [1.5, 2.0, 3.0, 4.0, 1.0]
    assert to_device(torch.ones(2), "meta").device.type == "meta"
    cpu = torch.ones(3)
    assert to_device(cpu, "cpu") is cpu  # on CPU nothing is copied


def test_eval_never_computes_in_float64_off_the_cpu():
    assert eval_dtype(torch.device("cpu")) == torch.float64  # the reference results, unchanged
    assert eval_dtype(torch.device("cuda")) == torch.float32
    assert eval_dtype(torch.device("meta")) == torch.float32


def _two_ranks(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from distill.dist import host_group, init_host_group

    init_host_group()
    summed = sum_over_ranks([float(rank), torch.tensor(rank + 1.0), 2], "cpu")
    hosts = host_sum([rank, True])
    result = {"device": str(summed.device), "sum": summed.tolist(), "host": hosts, "group": host_group()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_sums_over_a_real_gloo_group(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_ranks, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["device"] == "cpu" and r["group"] is None  # a gloo world is its own host group
        assert r["sum"] == [1.0, 3.0, 4.0] and r["host"] == [1.0, 2.0]


def test_a_lost_teacher_is_agreed_on_once_per_step():
    from launch.student import whole_steps

    def pairs(fail_at: int | None):
        for i in range(6):
            if i == fail_at:
                raise TeacherStreamError("gone")
            yield (i // 2, [i]), None

    steps = list(whole_steps(pairs(None), 2))
    assert [len(p) for p, _ in steps] == [2, 2, 2] and all(e is None for _, e in steps)
    steps = list(whole_steps(pairs(3), 2))  # lost in the middle of the second step: nothing of it trains
    assert [len(p) for p, _ in steps] == [2, 1] and isinstance(steps[-1][1], TeacherStreamError)


def test_rank_and_cached_teacher_import_no_ray():
    """teacher=cached / teacher.source=none: the driver, the rank module and the cache reader import
    nothing from Ray (the GPU check runs `launch.train teacher=cached` where Ray is not installed)."""
    code = (
        "import sys, launch.train, launch.student, distill.cache\n"
        "from distill.cache import CachedTeacher\n"
        "from distill.stream.routing import RoutedTeacherStream\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- GPU placement (distill/placement.py)


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5,7"}) == ["2", "5", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] == visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"})
    assert visible_gpus({}, device_count=3) == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("visible", "teachers", "students", "ranks", "want"),
    [
        (["0", "1", "2", "3"], 2.0, None, 2, (("0", "1"), ("2", "3"))),  # default: students get the rest
        (["4", "5", "6"], 0.5, None, 2, (("4",), ("5", "6"))),  # fractional teachers share one GPU
        (["0", "1", "2", "3"], 1.0, None, 2, (("0",), ("1", "2"))),  # one GPU per rank, the rest unused
        (["0", "1"], 2.0, None, 2, (("0", "1"), ())),  # no GPU left: the students train on CPU
        (["0", "1"], 0.0, 0, 2, ((), ())),  # trainer.gpus=0: CPU students, no teacher GPUs
        (["0", "1", "2"], 1.0, 2, 2, (("0",), ("1", "2"))),
        ([], 0.0, None, 4, ((), ())),  # a CPU machine: nothing changes
    ],
)
def test_teachers_and_students_get_disjoint_gpus(visible, teachers, students, ranks, want):
    split = split_gpus(visible, teachers, students, ranks)
    assert (split.teachers, split.students) == want
    assert not set(split.teachers) & set(split.students)
    assert set(split.teachers) | set(split.students) <= set(visible)


@pytest.mark.parametrize(
    ("visible", "teachers", "students", "ranks", "says"),
    [
        (["0"], 2.0, None, 1, "the teachers need 2 GPUs"),
        (["0"], 1.5, None, 1, "the teachers need 1.5 GPUs"),  # 1.5 takes two whole GPUs
        (["0", "1", "2"], 2.0, None, 2, "the 2 student ranks need 2 GPUs"),  # one left, two ranks
        (["0", "1", "2", "3"], 1.0, 2, 3, "trainer.gpus=2 but trainer.num_ranks=3"),
        (["0", "1"], 0.0, 4, 4, "the 4 student ranks need 4 GPUs"),
    ],
)
def test_too_few_gpus_is_a_config_error(visible, teachers, students, ranks, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        split_gpus(visible, teachers, students, ranks)


# ---------------------------------------------------------------- metric sums left on the device


def loss_runs(hidden, weight, values, indices, labels, mask, projector, teacher_hidden) -> dict:
    """Every loss the rank loop can call (KD fused and plain with CE, CE alone fused and plain, features)
    on the same inputs, as name -> a function returning its LossOutput."""
    from distill.losses import DistillationLoss
    from distill.losses.ce import cross_entropy, fused_cross_entropy

    loss_fn = DistillationLoss(ce_weight=0.5, chunk_size=3)
    return {
        "fused": lambda: loss_fn.fused(hidden, weight, values, indices, labels, mask, 7.0),
        "plain": lambda: loss_fn(hidden @ weight.T, values, indices, labels, mask, 7.0),
        "ce": lambda: cross_entropy(hidden @ weight.T, labels, mask, 7.0),
        "fused_ce": lambda: fused_cross_entropy(hidden, weight, labels, mask, 7.0, 3),
        "features": lambda: projector({0: hidden}, teacher_hidden, mask, 7.0),
    }


def test_loss_metrics_stay_on_the_device_with_the_same_numbers():
    """Inside `metrics_on_device` the KD, cross-entropy and feature losses return their metric sums as
    tensors (what the rank loop sums without a host sync per micro-batch), equal to the floats otherwise."""
    from distill.losses import FeatureProjector, metrics_on_device

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(30, 8, generator=g)
    values, indices = torch.randn(2, 5, 4, generator=g).log_softmax(-1) - 1, torch.randint(0, 30, (2, 5, 4))
    labels, mask = torch.randint(0, 30, (2, 5), generator=g), torch.rand(2, 5, generator=g) > 0.3
    projector = FeatureProjector({0: 1}, 8, 6, "mse", 1.0)
    teacher_hidden = {1: torch.randn(2, 5, 6, generator=g)}
    runs = loss_runs(hidden, weight, values, indices, labels, mask, projector, teacher_hidden)
    for name, run in runs.items():
        as_floats = run().metrics
        with metrics_on_device():
            on_device = run().metrics
        assert as_floats.keys() == on_device.keys(), name
        for key, value in on_device.items():
            assert isinstance(as_floats[key], float), (name, key)
            if key != "tokens" or name in ("ce", "fused_ce"):  # the others count rows: host ints
                assert torch.is_tensor(value) and value.device == hidden.device, (name, key)
            assert float(value) == as_floats[key], (name, key)  # the very same number


def test_a_micro_batch_never_waits_for_the_device():
    """The rank loop's losses, forward and backward, with every tensor on the meta device (no data: any
    read of a value on the host, `.item()`, `bool()`, a boolean selection, fails) except the loss mask,
    which the loop keeps on the host: the whole micro-batch runs, so it queues on an accelerator without
    one host sync (the step's one sync is the reduction after the last micro-batch). The old code
    selected masked rows with a device mask and range-checked the teacher's ids on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.losses import DistillationLoss, FeatureProjector, metrics_on_device
    from distill.student.objective import StudentObjective

    meta = torch.device("meta")
    hidden = torch.empty(2, 5, 8, device=meta, requires_grad=True)
    weight = torch.empty(30, 8, device=meta, requires_grad=True)
    values, indices = torch.empty(2, 5, 4, device=meta), torch.empty(2, 5, 4, dtype=torch.long, device=meta)
    labels = torch.empty(2, 5, dtype=torch.long, device=meta)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = False  # some rows not counted: they must be dropped without a sync
    loss_fn = DistillationLoss(ce_weight=0.5, chunk_size=3)
    projector = FeatureProjector({0: 1}, 8, 6, "mse", 1.0).to(meta)
    teacher_hidden = {1: torch.empty(2, 5, 6, device=meta)}
    runs = loss_runs(hidden, weight, values, indices, labels, mask, projector, teacher_hidden)
    with metrics_on_device():
        for name, run in runs.items():
            out = run()
            out.loss.backward()
            assert out.loss.device == meta, name
        config = LlamaConfig(
            vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        )
        with meta:
            model = LlamaForCausalLM(config)
        ids = torch.empty(2, 5, dtype=torch.long, device=meta)
        for fused in (True, False):
            objective = StudentObjective(model, loss_fn, fused=fused)
            loss, metrics = objective(ids, values, indices, labels, mask, 7.0, 0)
            loss.backward()
            assert loss.device == meta
            assert all(m.device == meta for m in metrics.values() if torch.is_tensor(m))


def test_the_driver_gives_teachers_and_ranks_disjoint_gpus(monkeypatch):
    """launch.train's split of this machine's GPUs from a composed config (the ids come from
    CUDA_VISIBLE_DEVICES, as on a GPU machine; nothing here touches a GPU)."""
    from hydra import compose, initialize_config_dir

    from launch.train import local_gpu_split

    overrides = ["teacher.gpus_per_replica=1", "teacher.replicas=2", "trainer.num_ranks=2"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    split = local_gpu_split(cfg)
    assert (split.teachers, split.students) == (("0", "1"), ("2", "3"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(ConfigError, match="the 2 student ranks need 2 GPUs"):
        local_gpu_split(cfg)
    cfg.ray.address = "head:6379"  # teachers on a Ray cluster: no local GPU is reserved for them
    assert local_gpu_split(cfg).students == ("0", "1")
    cfg.ray.address, cfg.teacher.source = None, "cached"  # no teacher runs: the students get the GPUs
    assert local_gpu_split(cfg) == split_gpus(["0", "1", "2"], 0.0, None, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_gpu_split(cfg) is None  # no GPU: the ranks' environment is left as it is


def test_a_stage_given_several_gpus_uses_all_of_them():
    from distill.teacher.pipeline import layer_devices

    cpu = torch.device("cpu")
    assert layer_devices(3, 0, cpu) == [cpu] * 3
    assert layer_devices(2, 1, torch.device("cuda")) == [torch.device("cuda", 0)] * 2
    spread = layer_devices(6, 3, torch.device("cuda"))
    assert [d.index for d in spread] == [0, 0, 1, 1, 2, 2]  # contiguous, even blocks, every GPU used
    assert sorted({d.index for d in layer_devices(7, 4, torch.device("cuda"))}) == [0, 1, 2, 3]
