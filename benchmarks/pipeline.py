"""Pipeline-sharded teacher: per-stage peak host memory vs its share of the weights, and throughput
of N stages vs 1 on the same model with several micro-batches in flight. Prints one JSON object.

    python benchmarks/pipeline.py                       # SmolLM2-135M, 1 vs 2 stages, 4x128 tokens
    python benchmarks/pipeline.py --stages 3 --batches 12
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import ray

from distill.models import resolve_model
from distill.teacher import connect_ray
from distill.teacher.pipeline import PipelineTeacher


def measure(model_dir: str, stages: int, batches: list[np.ndarray], in_flight: int, threads: int) -> dict:
    teacher = PipelineTeacher.start(model_dir, stages, dtype="float32", threads=threads, cpus_per_stage=0.1)
    try:
        info = ray.get(teacher.info())
        ray.get(teacher.submit_topk(-1, batches[0], 64))  # warm-up
        start, pending, done = time.perf_counter(), [], 0
        for i, batch in enumerate(batches):
            pending.append(teacher.submit_topk(i, batch, 64))
            if len(pending) >= in_flight:
                ray.get(pending.pop(0))
                done += 1
        ray.get(pending)
        elapsed = time.perf_counter() - start
        # after the forwards: every weight page a stage uses has been read, so it is resident now
        memory = ray.get([s.memory.remote() for s in teacher.stages])
    finally:
        teacher.shutdown()
    tokens = sum(b.size for b in batches)
    return {
        "stages": stages,
        "tokens_per_s": round(tokens / elapsed, 1),
        "per_stage": [
            {
                "layers": s["layers"],
                "weights_mib": round(s["parameters"] * 4 / 2**20, 1),
                "peak_rss_mib": round(m["VmHWM"], 1),
                "peak_above_runtime_mib": round(m["VmHWM"] - m["runtime"], 1),
            }
            for s, m in zip(info["stages"], memory)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage actor")
    args = parser.parse_args()
    model_dir = str(resolve_model(args.model))
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, 49152, size=(args.batch_size, args.seq_len), dtype=np.uint16)
        for _ in range(args.batches)
    ]
    connect_ray(None)
    one = measure(model_dir, 1, batches, args.in_flight, args.threads)
    many = measure(model_dir, args.stages, batches, args.in_flight, args.threads)
    print(
        json.dumps(
            {
                "benchmark": "pipeline_teacher",
                "command": "python benchmarks/pipeline.py "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
                "note": "peak_above_runtime_mib = peak RSS (after all forwards) minus RSS after imports, "
                "before any weight is read; weights are memory-mapped from safetensors, so untouched "
                "pages (embedding rows of tokens never seen) do not become resident",
                "single_stage": one,
                "pipelined": many,
                "throughput_ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
