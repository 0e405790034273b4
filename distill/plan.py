"""Capacity plan of a distillation run: what it costs per token, what fits on a GPU, how many teacher GPUs
keep the students fed, and what crosses the wire. Pure arithmetic on the models' config.json (built on the
meta device for exact parameter counts: no weights are read), so it runs for a 405B teacher on a laptop.

Formulas (also in the README, "Capacity plan"):
- forward FLOPs per token = 2 x (parameters in matmuls) + 2 x layers x seq_len x attention width
  (causal attention: each token's scores and mixing over on average seq_len / 2 keys, 2 x 2 FLOPs each);
  the LM head is one matmul even when tied to the embeddings, the embedding lookup is none;
- student training FLOPs per token = 3 x forward (the backward costs twice the forward);
- student tokens/s per GPU = peak dense FLOP/s x MFU / FLOPs per token; teacher GPUs per student GPU =
  student tokens/s per GPU / teacher tokens/s per GPU (measured rates replace the estimates when given);
- teacher replica layout = `stages` x `tensor_parallel` GPUs: the fewest GPUs (then the widest
  tensor parallelism, the shallowest pipeline) such that every GPU holds its stage's share of the layers
  (ceil(layers / stages) layers, split tensor_parallel ways), the embedding on the first stage and the LM
  head on the last (both replicated across a stage's tensor-parallel ranks), plus working memory (the
  micro-batch's activations, 4 x B x T x hidden x dtype bytes, and the reply's logits chunk), within the
  usable memory per GPU; tensor_parallel divides the attention and key/value heads and is at most the GPUs
  of one node (a tensor-parallel group never crosses nodes);
- tensor parallelism's all-reduces: two per layer (attention and MLP outputs), each of hidden x dtype
  bytes per token; a ring all-reduce over n ranks takes 2 (n - 1) / n x bytes / bus bandwidth
  (`plan.tp_bus_gbs`, what nccl-tests calls busbw); they add to each stage's compute time per token;
  a pipeline hop sends hidden x dtype bytes per token over the network (`plan.network_gbs`);
- teacher tokens/s per GPU (estimated) = 1 / (GPUs per replica x max(stage compute + all-reduce time,
  hop time) per token), stage compute = forward FLOPs / (GPUs per replica x peak x MFU);
- student memory per GPU (mixed precision with fp32 master weights and Adam: 2 + 2 + 4 + 8 bytes per
  parameter for weights, gradients, master copy and moments; fp32: 4 + 4 + 8): ZeRO-1 divides the
  optimizer state (master + moments) by the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too;
  activations ~ 34 x B x T x hidden bytes per layer in bf16 (Korthikanti et al. 2022, no attention-score
  term with fused attention), with gradient checkpointing one layer's plus 2 x B x T x hidden per layer;
  plus the fused loss's chunk of fp32 logits;
- stream bytes/s = student tokens/s x (k x (value bytes + id bytes)); with a `stream.codec`, the
  codec's bytes/token measured on the real teacher at k=64 (`CODEC_BYTES_PER_TOKEN_K64`), times k / 64:
  compression depends on the teacher and the text, so this is an estimate, labelled as such.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# stream.codec's bytes/token at k=64, 1,024 tokens per reply: SmolLM2-135M-Instruct on pydoc text
# (benchmarks/results/stream_codecs.json); zstd by values dtype, the hybrid grids whatever the dtype
CODEC_BYTES_PER_TOKEN_K64 = {
    ("zstd", "float32"): 256.53,
    ("zstd", "float16"): 152.15,
    ("zstd", "bfloat16"): 133.14,
    "hybrid": 144.83,
    "hybrid_coarse": 128.43,
}


@dataclass
class ModelShape:
    """What the plan needs of a causal LM, from its config.json."""

    parameters: int  # every parameter once (a tied head is the embedding matrix)
    matmul_parameters: (
        int  # the weight matrices a token multiplies by: not the embedding lookup, the head once
    )
    layers: int
    hidden: int
    attention_width: int  # heads x head dim
    vocab: int
    heads: int = 1  # attention heads
    kv_heads: int = 1  # key/value heads (GQA)
    embedding: int = 0  # parameters of the input embedding
    head: int = 0  # parameters of the LM head
    tied: bool = False  # the LM head is the embedding matrix (counted once in `parameters`)


def model_shape(folder: str | Path) -> ModelShape:
    """Exact counts from the model transformers builds for `folder`'s config.json on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)  # norms and biases: no matmul
    matmul = matrices - embedding.numel() + (head.numel() if head is embedding else 0)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        parameters,
        matmul,
        text.num_hidden_layers,
        text.hidden_size,
        heads * head_dim,
        text.vocab_size,
        heads,
        kv_heads,
        embedding.numel(),
        head.numel(),
        head is embedding,
    )


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    return 2.0 * shape.matmul_parameters + 2.0 * shape.layers * seq_len * shape.attention_width


def teacher_layout(
    shape: ModelShape, dtype_bytes: int, working: float, usable: float, gpus_per_node: int
) -> dict[str, float]:
    """The replica layout of the module docstring: {tensor_parallel, stages, gpus, gib_per_gpu (its fullest
    GPU), fits}. When no layout fits (a layer too large even split over a node), the one whose fullest GPU
    holds least, with `fits` False."""
    tied = shape.tied
    layer = (shape.parameters - shape.embedding - (0 if tied else shape.head)) / shape.layers * dtype_bytes
    embedding, head = shape.embedding * dtype_bytes, shape.head * dtype_bytes
    widths = [n for n in range(1, gpus_per_node + 1) if shape.heads % n == 0 and shape.kv_heads % n == 0]
    candidates = []
    for tp in widths:
        for stages in range(1, shape.layers + 1):
            share = math.ceil(shape.layers / stages) * layer / tp + working
            ends = embedding + (0 if tied else head) if stages == 1 else max(embedding, head)
            fullest = share + ends
            if fullest <= usable or stages == shape.layers:  # this width's shallowest fit, or its deepest
                candidates.append((fullest > usable, tp * stages, -tp, stages, fullest))
                break
    fits = [c for c in candidates if not c[0]]
    over, gpus, minus_tp, stages, fullest = min(fits) if fits else min(candidates, key=lambda c: c[4])
    return {
        "tensor_parallel": -minus_tp,
        "stages": stages,
        "gpus": gpus,
        "gib_per_gpu": fullest / 2**30,
        "fits": not over,
    }


def tensor_parallel_bytes_per_token(shape: ModelShape, layout: dict, dtype_bytes: int) -> float:
    """Bytes each GPU of a stage sends per token for the stage's all-reduces (ring; module docstring)."""
    n = layout["tensor_parallel"]
    layers = math.ceil(shape.layers / layout["stages"])
    return 2 * layers * 2 * (n - 1) / n * shape.hidden * dtype_bytes


def hop_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes one pipeline hop sends per token: the hidden state in the model's dtype."""
    return shape.hidden * dtype_bytes


def student_memory_bytes(
    shape: ModelShape,
    precision: str,
    zero_stage: int,
    ranks: int,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    loss_chunk: int,
) -> dict[str, float]:
    """Bytes per student GPU, by part (see the module docstring)."""
    n = shape.parameters
    half = precision in ("bf16", "fp16")
    weights, grads = (2 * n, 2 * n) if half else (4 * n, 4 * n)
    optimizer = (4 * n if half else 0) + 8 * n  # fp32 master copy (mixed precision) + Adam's two moments
    if zero_stage >= 1:
        optimizer /= ranks
    if zero_stage >= 2:
        grads /= ranks
    if zero_stage >= 3:
        weights /= ranks
    tokens = micro_batch * seq_len
    per_layer = 34 * tokens * shape.hidden * (1 if half else 2)
    if gradient_checkpointing:
        activations = per_layer + shape.layers * 2 * tokens * shape.hidden * (1 if half else 2)
    else:
        activations = shape.layers * per_layer
    loss = 2 * min(loss_chunk, tokens) * shape.vocab * 4
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "loss": loss,
    }


def plan(
    teacher: ModelShape,
    student: ModelShape,
    *,
    seq_len: int,
    micro_batch: int,
    teacher_dtype: str,
    precision: str,
    zero_stage: int,
    student_gpus: int,
    gradient_checkpointing: bool,
    loss_chunk: int,
    topk: int,
    values_dtype: str,
    gpu_memory_gib: float,
    codec: str = "none",
    gpus_per_node: int = 8,
    tp_bus_gbs: float = 360.0,
    network_gbs: float = 50.0,
    usable_fraction: float,
    peak_tflops: float,
    teacher_mfu: float,
    student_mfu: float,
    teacher_tokens_per_s_per_gpu: float | None = None,
    student_tokens_per_s_per_gpu: float | None = None,
    tokens: float | None = None,
) -> dict:
    """The plan of one composed run, as a JSON-able dict (see the module docstring for each formula)."""
    usable = gpu_memory_gib * 2**30 * usable_fraction
    teacher_fwd = forward_flops_per_token(teacher, seq_len)
    student_train = 3 * forward_flops_per_token(student, seq_len)
    dtype_bytes = BYTES[teacher_dtype]
    teacher_weights = teacher.parameters * dtype_bytes
    working = 4 * micro_batch * seq_len * teacher.hidden * dtype_bytes + 2 * 256 * 2**20
    layout = teacher_layout(teacher, dtype_bytes, working, usable, gpus_per_node)
    gpus_per_replica = layout["gpus"]
    compute_s = teacher_fwd / (gpus_per_replica * peak_tflops * 1e12 * teacher_mfu)  # per token, per stage
    tp_bytes = tensor_parallel_bytes_per_token(teacher, layout, dtype_bytes)
    tp_s, hop_s = (
        tp_bytes / (tp_bus_gbs * 1e9),
        hop_bytes_per_token(teacher, dtype_bytes) / (network_gbs * 1e9),
    )
    estimated = 1 / (gpus_per_replica * max(compute_s + tp_s, hop_s if layout["stages"] > 1 else 0))
    teacher_tps = teacher_tokens_per_s_per_gpu or estimated
    student_tps = student_tokens_per_s_per_gpu or peak_tflops * 1e12 * student_mfu / student_train
    ratio = student_tps / teacher_tps  # teacher GPUs per student GPU
    teacher_gpus = math.ceil(ratio * student_gpus)
    replicas = max(1, math.ceil(teacher_gpus / gpus_per_replica))
    student_mem = student_memory_bytes(
        student, precision, zero_stage, student_gpus, micro_batch, seq_len, gradient_checkpointing, loss_chunk
    )
    bytes_per_token = topk * (BYTES[values_dtype] + (2 if student.vocab <= 65536 else 4))
    if codec != "none":
        measured = CODEC_BYTES_PER_TOKEN_K64.get(codec) or CODEC_BYTES_PER_TOKEN_K64[codec, values_dtype]
        bytes_per_token = round(measured * topk / 64, 1)
    students_tps = student_tps * student_gpus
    out = {
        "teacher": {
            **asdict(teacher),
            "forward_flops_per_token": teacher_fwd,
            "tokens_per_s_per_gpu": teacher_tps,
            "weights_gib": teacher_weights / 2**30,
            "layout": layout,
            "tp_bytes_per_token_per_gpu": tp_bytes,
            "tp_share_of_stage_time": tp_s / (compute_s + tp_s),
            "hop_bytes_per_token": hop_bytes_per_token(teacher, dtype_bytes) if layout["stages"] > 1 else 0,
            "hop_s_per_token": hop_s,
            "gpus_per_replica": gpus_per_replica,
            "replicas": replicas,
            "gpus": replicas * gpus_per_replica,
        },
        "student": {
            **asdict(student),
            "train_flops_per_token": student_train,
            "tokens_per_s_per_gpu": student_tps,
            "gpus": student_gpus,
            "memory_gib_per_gpu": {k: v / 2**30 for k, v in student_mem.items()},
            "memory_gib_per_gpu_total": sum(student_mem.values()) / 2**30,
            "fits": sum(student_mem.values()) <= usable,
        },
        "teacher_gpus_per_student_gpu": ratio,
        "teacher_to_student_flops": teacher_fwd / student_train,
        "stream_bytes_per_token": bytes_per_token,
        "stream_codec": codec,
        "stream_mb_per_s": students_tps * bytes_per_token / 1e6,
        "students_tokens_per_s": students_tps,
        "usable_gib_per_gpu": usable / 2**30,
    }
    if tokens:
        out["tokens"] = tokens
        out["hours"] = tokens / students_tps / 3600
        out["gpu_hours"] = out["hours"] * (student_gpus + replicas * gpus_per_replica)
    return out


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def describe(p: dict) -> str:
    """The plan as the lines `launch.plan` prints."""
    t, s = p["teacher"], p["student"]
    lay = t["layout"]
    mem = ", ".join(f"{k} {v:.1f}" for k, v in s["memory_gib_per_gpu"].items())
    fits = "fits" if s["fits"] else "DOES NOT FIT (more ranks, ZeRO-3, gradient checkpointing)"
    lines = [
        f"teacher   {_si(t['parameters'])} parameters, {_si(t['forward_flops_per_token'])}FLOP/token "
        f"forward, weights {t['weights_gib']:.1f} GiB -> {t['gpus_per_replica']} GPU(s) per replica "
        f"({p['usable_gib_per_gpu']:.0f} GiB usable each)",
        f"replica   {lay['stages']} stage(s) x tensor-parallel {lay['tensor_parallel']}: "
        f"{lay['gib_per_gpu']:.1f} GiB on its fullest GPU{'' if lay['fits'] else ' (DOES NOT FIT)'}; "
        f"all-reduces {_si(t['tp_bytes_per_token_per_gpu'])}B/token per GPU "
        f"({100 * t['tp_share_of_stage_time']:.0f}% of a stage's time), hops "
        f"{_si(t['hop_bytes_per_token'])}B/token",
        f"student   {_si(s['parameters'])} parameters, {_si(s['train_flops_per_token'])}FLOP/token training, "
        f"{s['memory_gib_per_gpu_total']:.1f} GiB per GPU ({mem}): {fits}",
        f"rates     teacher {_si(t['tokens_per_s_per_gpu'])} tokens/s per GPU, student "
        f"{_si(s['tokens_per_s_per_gpu'])} -> {p['teacher_gpus_per_student_gpu']:.2f} teacher GPUs per "
        f"student GPU (teacher:student FLOPs per token {p['teacher_to_student_flops']:.2f})",
        f"layout    {s['gpus']} student GPUs + {t['replicas']} replica(s) x {t['gpus_per_replica']} teacher "
        f"GPUs (teacher.replicas={t['replicas']} teacher.stages={lay['stages']} "
        f"teacher.tensor_parallel={lay['tensor_parallel']} teacher.gpus_per_replica={t['gpus_per_replica']})",
        f"stream    {p['stream_bytes_per_token']} bytes/token x {_si(p['students_tokens_per_s'])} tokens/s = "
        f"{p['stream_mb_per_s']:.1f} MB/s (stream.codec={p['stream_codec']})",
    ]
    if "hours" in p:
        hours = f"{p['hours']:.1f} h, {_si(p['gpu_hours'])} GPU-hours"
        lines.append(f"time      {_si(p['tokens'])} tokens: {hours}")
    return "\n".join(lines)
