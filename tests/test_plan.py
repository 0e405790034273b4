"""The capacity plan (distill/plan.py, `python -m launch.plan`): its FLOP counts against PyTorch's own
FLOP counter on a real model, its parameter counts against the closed form of a Llama, its ZeRO memory
arithmetic by hand, and the command on config-only folders of a 405B teacher and an 8B student."""

from __future__ import annotations

import json

import pytest
import torch
from test_online import run_module
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from distill.plan import (
    CODEC_BYTES_PER_TOKEN_K64,
    forward_flops_per_token,
    model_shape,
    plan,
    student_memory_bytes,
)

LLAMA_405B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "num_hidden_layers": 126,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA_8B = {**LLAMA_405B, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32}
LLAMA_8B["num_hidden_layers"] = 32


def config_folder(tmp_path, name: str, config: dict):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_flops_per_token_equal_pytorchs_flop_counter(tiny_teacher_dir):
    """Eager attention computes the full [T, T] scores, so PyTorch counts twice the causal attention term
    the plan charges; the matmuls match exactly, and a training step counts three forwards."""
    shape = model_shape(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, attn_implementation="eager")
    ids = torch.randint(0, 256, (2, 64))
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(input_ids=ids)
    with FlopCounterMode(display=False) as step:
        model(input_ids=ids).logits.sum().backward()
    attention = 2 * shape.layers * 64 * shape.attention_width
    assert forward.get_total_flops() / ids.numel() == forward_flops_per_token(shape, 64) + attention
    assert step.get_total_flops() == 3 * forward.get_total_flops()


def test_parameter_counts_equal_the_closed_form_of_a_llama(tmp_path):
    c = LLAMA_405B
    d, layers, vocab, ff = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    head_dim = d // c["num_attention_heads"]
    attention = d * d + 2 * d * c["num_key_value_heads"] * head_dim + d * d
    per_layer = attention + 3 * d * ff + 2 * d  # + two RMSNorm weights
    total = 2 * vocab * d + layers * per_layer + d  # embedding, untied head, final norm
    shape = model_shape(config_folder(tmp_path, "405b", c))
    assert shape.parameters == total == 405_853_388_800
    assert shape.matmul_parameters == total - vocab * d - layers * 2 * d - d  # no lookup, no norms


def test_zero_stages_divide_the_student_state_by_the_ranks(tmp_path):
    shape = model_shape(config_folder(tmp_path, "8b", LLAMA_8B))
    n = shape.parameters

    def memory(stage, precision="bf16"):
        return student_memory_bytes(shape, precision, stage, 8, 1, 4096, False, 1024)

    assert (
        memory(0)["weights"] == 2 * n and memory(0)["gradients"] == 2 * n and memory(0)["optimizer"] == 12 * n
    )
    assert memory(1)["optimizer"] == 12 * n / 8 and memory(1)["gradients"] == 2 * n
    assert memory(2)["gradients"] == 2 * n / 8 and memory(2)["weights"] == 2 * n
    assert memory(3)["weights"] == 2 * n / 8
    assert memory(0, "fp32")["weights"] == 4 * n and memory(0, "fp32")["optimizer"] == 8 * n


def test_the_plan_command_on_a_405b_teacher_and_an_8b_student(tmp_path):
    teacher, student = config_folder(tmp_path, "405b", LLAMA_405B), config_folder(tmp_path, "8b", LLAMA_8B)
    args = [
        "teacher=local",
        f"teacher.model.name_or_path={teacher}",
        "student=local",
        f"student.model.name_or_path={student}",
        "data.seq_len=4096",
        "trainer.micro_batch_size=1",
        "plan.student_gpus=64",
        "plan.tokens=1e12",
    ]
    proc = run_module("launch.plan", args)
    assert proc.returncode == 0
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    t = plan["teacher"]
    assert t["weights_gib"] == pytest.approx(405_853_388_800 * 2 / 2**30)
    # 756 GiB of bf16 weights over 72 usable GiB per 80 GiB GPU: 11 GPUs of weights alone; whole layers
    # per stage, the head on the last one, a layer's share split tensor-parallel: 3 stages x TP 4
    assert (t["layout"]["stages"], t["layout"]["tensor_parallel"], t["gpus_per_replica"]) == (3, 4, 12)
    assert "teacher.stages=3 teacher.tensor_parallel=4" in proc.stdout
    assert plan["stream_bytes_per_token"] == 64 * (2 + 4)  # fp16 values, int32 ids (vocab > 65,536)
    ratio = plan["teacher_gpus_per_student_gpu"]
    # the MFUs' ratio, the teacher slowed by its all-reduces' share of a stage's time
    slowdown = 1 / (1 - t["tp_share_of_stage_time"])
    assert ratio == pytest.approx(plan["teacher_to_student_flops"] * 0.35 / 0.4 * slowdown)
    assert t["replicas"] * t["gpus_per_replica"] >= ratio * 64
    assert "teacher.replicas=" in proc.stdout and "GPU-hours" in proc.stdout

    refused = run_module("launch.plan", [*args, "plan.teacher_mfu=0"])
    assert refused.returncode == 2 and "plan.teacher_mfu=0" in refused.stderr


def test_the_stream_bandwidth_counts_the_codec(tmp_path):
    """stream.codec scales the stream's bytes by the codec's measured bytes/token (k / 64 of it)."""
    shape = model_shape(config_folder(tmp_path, "llama-8b", LLAMA_8B))
    run = dict(
        seq_len=4096, micro_batch=1, teacher_dtype="bfloat16", precision="bf16", zero_stage=2,
        student_gpus=8, gradient_checkpointing=True, loss_chunk=1024, values_dtype="float16",
        gpu_memory_gib=80, usable_fraction=0.9, peak_tflops=989, teacher_mfu=0.4, student_mfu=0.35,
    )  # fmt: skip
    plain = plan(shape, shape, topk=64, **run)
    packed = plan(shape, shape, topk=64, codec="hybrid", **run)
    half = plan(shape, shape, topk=32, codec="zstd", **run)
    assert plain["stream_bytes_per_token"] == 64 * (2 + 4) and packed["stream_codec"] == "hybrid"
    assert packed["stream_bytes_per_token"] == round(CODEC_BYTES_PER_TOKEN_K64["hybrid"], 1)
    assert packed["stream_mb_per_s"] == pytest.approx(
        plain["stream_mb_per_s"] * packed["stream_bytes_per_token"] / 384
    )
    assert half["stream_bytes_per_token"] == round(CODEC_BYTES_PER_TOKEN_K64["zstd", "float16"] / 2, 1)


def test_the_replica_layout_and_its_all_reduces_by_hand(tmp_path):
    """The layout is the fewest GPUs whose fullest one fits (then the widest tensor parallelism that divides
    the heads and fits a node); all-reduces and hops are counted as the module docstring says."""
    from distill.plan import hop_bytes_per_token, teacher_layout, tensor_parallel_bytes_per_token

    shape = model_shape(config_folder(tmp_path, "405b", LLAMA_405B))
    gib = 2**30
    layer = (shape.parameters - 2 * shape.embedding) / 126 * 2  # bf16 bytes of one decoder layer
    head = shape.head * 2
    layout = teacher_layout(shape, 2, working=gib, usable=72 * gib, gpus_per_node=8)
    assert (layout["tensor_parallel"], layout["stages"], layout["gpus"]) == (4, 3, 12)
    assert layout["gib_per_gpu"] * gib == pytest.approx(42 * layer / 4 + head + gib)  # 126 / 3 layers
    # 8 GPUs per node: TP 8 x 2 stages is 16 GPUs, more than 12; 4 per node: TP 4 again
    assert teacher_layout(shape, 2, gib, 72 * gib, gpus_per_node=4)["gpus"] == 12
    # on 141 GiB GPUs (H200): 7 stages of 18 layers (TP 2 needs 4 x 2, since 3 stages of 42 layers over
    # 2 GPUs do not fit; TP 4 and TP 8 need 8 GPUs too)
    h200 = teacher_layout(shape, 2, gib, 0.9 * 141 * gib, gpus_per_node=8)
    assert (h200["tensor_parallel"], h200["stages"]) == (1, 7)
    # a layer too big for any split: the widest, one layer per stage, flagged
    tiny_gpu = teacher_layout(shape, 2, gib, 1 * gib, gpus_per_node=8)
    assert not tiny_gpu["fits"] and (tiny_gpu["tensor_parallel"], tiny_gpu["stages"]) == (8, 126)

    # ring all-reduce: 2 (n-1)/n of each message; two messages of hidden x 2 bytes per layer per token
    assert tensor_parallel_bytes_per_token(shape, layout, 2) == 2 * 42 * 2 * 3 / 4 * 16384 * 2
    assert tensor_parallel_bytes_per_token(shape, {"tensor_parallel": 1, "stages": 12}, 2) == 0
    assert hop_bytes_per_token(shape, 2) == 16384 * 2
