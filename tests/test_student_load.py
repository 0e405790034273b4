"""How a student rank loads its model (distill/student/engine.py `load_student`): under ZeRO-3 it is built
partitioned (`deepspeed.zero.Init`), so no rank holds the whole model, and gathering gives back the
checkpoint's weights exactly. One real single-rank gloo process (DS_ACCELERATOR=cpu), a few seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent

RANK = """
import sys

import deepspeed
import torch
from safetensors.torch import load_file

from distill.config import TrainerConfig
from distill.student.engine import init_distributed, load_student

init_distributed("gloo")
folder, stage = sys.argv[1], int(sys.argv[2])
t = TrainerConfig(zero_stage=stage, num_ranks=1, micro_batch_size=1, precision="fp32")
model = load_student(folder, t, 1, document_eos=2)
params = dict(model.named_parameters())
partitioned = [name for name, p in params.items() if hasattr(p, "ds_id") and p.numel() == 0]
print("partitioned", len(partitioned), "of", len(params))
print("attention", model.config._attn_implementation)
print("isolation", getattr(model, "_distill_document_eos", None))
reference = load_file(f"{folder}/model.safetensors")
with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
    same = all(torch.equal(p.detach(), reference[name]) for name, p in params.items())
print("gathered equal", same)
"""


def run_rank(student_dir: Path, stage: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RANK, str(student_dir), str(stage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_a_zero3_student_is_built_partitioned_and_gathers_to_its_checkpoint(tiny_student_dir: Path):
    out = run_rank(tiny_student_dir, 3)
    params = len(load_file(tiny_student_dir / "model.safetensors"))
    assert f"partitioned {params} of {params}" in out  # every parameter: none materialised whole
    assert "attention sdpa" in out  # CPU, fp32: no flash attention
    assert "isolation 2" in out  # packed documents kept apart
    assert "gathered equal True" in out


def test_gpu_trainer_presets_are_bf16_nccl_and_validate():
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for preset, stage in (("zero2_gpu", 2), ("zero3_gpu", 3)):
            cfg = compose(config_name="config", overrides=[f"trainer={preset}"])
            validate(cfg)
            t = cfg.trainer
            assert (t.zero_stage, t.precision, t.dist_backend) == (stage, "bf16", "nccl")
            assert cfg.student.attn_implementation == "auto" and cfg.teacher.dtype == "auto"
