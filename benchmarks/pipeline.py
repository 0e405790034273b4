"""Sharded teacher replicas: throughput and per-actor peak host memory vs its share of the weights, for
pipeline stages (PP) x tensor-parallel ranks per stage (TP), with several micro-batches in flight. Prints
one JSON object: one row per (TP, PP), the first being the unsharded replica the others are compared to.

    python benchmarks/pipeline.py                             # SmolLM2-135M: TP 1/3 x PP 1/2, 4x128 tokens
    python benchmarks/pipeline.py --stages 1 3 --batches 12   # TP 1 x PP 1/3
    python benchmarks/pipeline.py --tensor-parallel 1 --stages 1 2

    python benchmarks/pipeline.py --deep                      # a 405B-shaped deep narrow model, split 8 ways

SmolLM2-135M has 9 attention heads and 3 key/value heads, so TP=2 cannot split it (refused before any
actor starts); TP=3 is its smallest tensor-parallel size. On CPU the ranks talk over gloo (TCP on one host).

`--deep` builds a model shaped like Llama-3.1-405B at scaled width (126 layers, hidden 256 = 16,384 / 64,
MLP 832 in the same 3.25 ratio, 16 heads over 2 key/value heads, SmolLM2's 49,152-token vocabulary, random
weights: 124M parameters) and runs it unsharded, as 8 pipeline stages, and as 4 stages x TP 2, each row's
top-k checked against the unsharded replica's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from distill.models import resolve_model
from distill.teacher import connect_ray
from distill.teacher.pipeline import PipelineTeacher


def measure(
    model_dir: str, stages: int, tp: int, batches: list[np.ndarray], in_flight: int, threads: int
) -> dict:
    """Throughput of one replica of `stages` x `tp` actors over `batches`, and every actor's memory."""
    teacher = PipelineTeacher.start(
        model_dir,
        stages,
        dtype="float32",
        threads=threads,
        cpus_per_stage=0.1,
        name=f"bench-tp{tp}-pp{stages}",  # unique: the previous row's actors may still hold their names
        tensor_parallel=tp,
    )
    try:
        info = ray.get(teacher.info())
        first = ray.get(teacher.submit_topk(-1, batches[0], 64))  # warm-up; compared across rows
        start, pending = time.perf_counter(), []
        for i, batch in enumerate(batches):
            pending.append(teacher.submit_topk(i, batch, 64))
            if len(pending) >= in_flight:
                ray.get(pending.pop(0))
        ray.get(pending)
        elapsed = time.perf_counter() - start
        # after the forwards: every weight page an actor uses has been read, so it is resident now
        memory = ray.get([actor.memory.remote() for group in teacher.groups for actor in group])
    finally:
        teacher.shutdown()
    tokens = sum(b.size for b in batches)
    ranks = [(s, r) for s, stage in enumerate(info["stages"]) for r in stage.get("ranks", [stage])]
    return {
        "tensor_parallel": tp,
        "stages": stages,
        "actors": stages * tp,
        "tokens_per_s": round(tokens / elapsed, 1),
        "first_reply": first,
        "per_actor": [
            {
                "stage": s,
                "tp_rank": r.get("tp_rank", 0),
                "layers": r["layers"],
                "weights_mib": round(r["parameters"] * 4 / 2**20, 1),
                "peak_rss_mib": round(m["VmHWM"], 1),
                "peak_above_runtime_mib": round(m["VmHWM"] - m["runtime"], 1),
            }
            for (s, r), m in zip(ranks, memory, strict=True)
        ],
    }


def deep_model() -> Path:
    """The 405B-shaped deep narrow model of the module docstring, built once under the system temp dir."""
    from distill.models import smollm2_folder, tiny_llama

    out = Path(tempfile.gettempdir()) / "distill-bench-deep-126"
    if not (out / "model.safetensors").is_file():
        tiny_llama(
            out,
            vocab_size=49152,
            hidden_size=256,
            num_layers=126,
            num_heads=16,
            num_kv_heads=2,
            intermediate_size=832,
            max_position_embeddings=4096,
            tokenizer_dir=smollm2_folder(),
            initializer_range=0.05,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="pipeline stages (PP) to run")
    parser.add_argument(
        "--tensor-parallel", type=int, nargs="+", default=[1, 3], help="tensor-parallel ranks per stage"
    )
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--deep", action="store_true", help="the 405B-shaped deep narrow model, 8 ways")
    args = parser.parse_args()
    if args.deep:
        args.model, args.stages, args.tensor_parallel = str(deep_model()), [1, 8, 4], [1, 1, 2]
        pairs = list(zip(args.tensor_parallel, args.stages, strict=True))
    else:
        pairs = [(tp, stages) for tp in args.tensor_parallel for stages in args.stages]
    folder = resolve_model(args.model)
    model_dir, vocab = str(folder), json.loads((folder / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, vocab, size=(args.batch_size, args.seq_len), dtype=np.uint16)
        for _ in range(args.batches)
    ]
    connect_ray(None)
    rows = [measure(model_dir, stages, tp, batches, args.in_flight, args.threads) for tp, stages in pairs]
    base, reference = rows[0]["tokens_per_s"], rows[0]["first_reply"]
    for row in rows:
        row["throughput_vs_first"] = round(row["tokens_per_s"] / base, 2)
        reply = row.pop("first_reply")  # the first batch's top-k against the first row's (unsharded)
        row["top1_equal_to_first"] = float((reply.indices[..., 0] == reference.indices[..., 0]).mean())
        row["max_abs_diff_to_first"] = float(np.abs(reply.values - reference.values).max())
    print(
        json.dumps(
            {
                "benchmark": "pipeline_teacher",
                "command": " ".join(["python", "benchmarks/pipeline.py", *sys.argv[1:]]),
                "note": "peak_above_runtime_mib = peak RSS (after all forwards) minus RSS after imports, "
                "before any weight is read; weights_mib = the actor's own tensors (its shards and its "
                "replicated ones) in fp32; whole tensors are memory-mapped from safetensors, so untouched "
                "pages (embedding rows of tokens never seen) do not become resident",
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
