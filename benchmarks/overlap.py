"""Overlap efficiency of online distillation: does streaming hide the teacher behind the student?

One student rank (DeepSpeed, the library's engine and fused loss) and one teacher actor (Ray) go over
the same micro-batches three times:
  teacher-only  the stream alone: every micro-batch's top-k requested and received, nothing trained
  student-only  training steps on the teacher outputs stored by the first pass (no teacher running)
  online        training steps on outputs streamed live, `prefetch` requests in flight
efficiency = online time / max(teacher-only, student-only); 1.0 is perfect overlap (target <= 1.15).
Teacher and student each get one thread, so on a 2-core machine they do not share a core.
Prints one JSON object.

    python benchmarks/overlap.py                         # SmolLM2-135M teacher -> 2-layer student
    python benchmarks/overlap.py --steps 30 --prefetch 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import numpy as np
import torch

from distill.config import TrainerConfig
from distill.data import load_documents, pack_documents
from distill.losses import DistillationLoss
from distill.models import load_causal_lm, load_tokenizer, resolve_model, student_from_teacher
from distill.stream import TeacherStream
from distill.student.engine import build_engine, init_distributed
from distill.student.objective import StudentObjective
from distill.teacher import TeacherPool, connect_ray


def single_rank_process_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    init_distributed("gloo")


def train_steps(engine, batches: list[np.ndarray], outputs) -> float:
    """Seconds for one optimizer step per micro-batch, teacher outputs taken from `outputs` in order."""
    start = time.perf_counter()
    for step, (ids_np, out) in enumerate(zip(batches, outputs)):
        ids = torch.from_numpy(ids_np.astype(np.int64))
        values, indices = out.tensors()
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        mask = torch.ones_like(ids, dtype=torch.bool)
        loss, _ = engine(ids, values, indices, labels, mask, float(ids.numel()), step)
        engine.backward(loss)
        engine.step()
    return time.perf_counter() - start


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student-layers", default="0,29")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    teacher_dir = resolve_model(args.teacher)
    student_dir = student_from_teacher(teacher_dir, [int(x) for x in args.student_layers.split(",")])
    tokens = pack_documents(load_documents("pydoc_topics"), load_tokenizer(teacher_dir), args.seq_len).tokens
    batches = [tokens[i * args.batch : (i + 1) * args.batch] for i in range(args.steps + 1)]  # +1 warm-up

    single_rank_process_group()
    t = TrainerConfig(num_ranks=1, max_steps=len(batches), warmup_steps=0, lr=1e-4)
    objective = StudentObjective(load_causal_lm(student_dir, dtype="float32"), DistillationLoss(), fused=True)
    engine = build_engine(objective, t, world_size=1)

    connect_ray(None, num_cpus=2)
    pool = TeacherPool.start("overlap", teacher_dir, 1, "float32", "sdpa", 1, 1.0, 0.0)
    try:
        stream = TeacherStream(pool.actors, args.topk, args.prefetch, "float16", 600)
        list(stream.stream(batches[:1], lambda b: b))  # warm both sides up on one batch
        train_steps(engine, batches[:1], [out for _, out in stream.stream(batches[:1], lambda b: b)])
        measured = batches[1:]

        start = time.perf_counter()
        stored = [out for _, out in stream.stream(measured, lambda b: b)]
        teacher_s = time.perf_counter() - start
        student_s = train_steps(engine, measured, stored)
        live = (out for _, out in stream.stream(measured, lambda b: b))
        online_s = train_steps(engine, measured, live)
    finally:
        pool.shutdown()
    n_tokens = sum(b.size for b in measured)
    return {
        "benchmark": "overlap_efficiency",
        "command": "python benchmarks/overlap.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "tokens": n_tokens,
        "teacher_only_s": round(teacher_s, 2),
        "student_only_s": round(student_s, 2),
        "online_s": round(online_s, 2),
        "efficiency": round(online_s / max(teacher_s, student_s), 3),
        "target": 1.15,
        "online_tokens_per_s": round(n_tokens / online_s, 1),
        # overlap needs a free core for each side: a load average above the core count means other work
        # shared the cores and the online time tends to the sum of the two, not their maximum
        "cpu_cores": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
