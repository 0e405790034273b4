"""Transport cost of the teacher stream, without the teacher: how fast replies of the real payload size
cross from a Ray actor to the student, next to a plain memcpy of the same bytes.

An echo actor returns a pre-built `TeacherOutput` (top-k values fp16, ids uint16, the shape a real
teacher sends) for every request; the student side is the library's `TeacherStream` with its usual
prefetch. The memcpy baseline copies the same number of bytes per micro-batch within one process.
Prints one JSON object.

    python benchmarks/transport.py                      # 4 x 256 tokens, k = 64, 200 requests
    python benchmarks/transport.py --topk 128 --prefetch 4 --hidden 576
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import ray

from distill.stream import TeacherStream
from distill.teacher import connect_ray
from distill.teacher.actor import TeacherOutput, index_dtype


@ray.remote(num_cpus=1)
class EchoTeacher:
    """Answers every request with the same pre-built reply: transport only, no model."""

    def __init__(self, batch: int, seq_len: int, k: int, vocab: int, hidden: int):
        rng = np.random.default_rng(0)
        self.values = rng.standard_normal((batch, seq_len, k)).astype(np.float16)
        self.indices = rng.integers(0, vocab, (batch, seq_len, k)).astype(index_dtype(vocab))
        self.hidden = rng.standard_normal((1, batch, seq_len, hidden)).astype(np.float16) if hidden else None

    def topk(self, request_id, input_ids, k, values_dtype="float16", hidden_layers=None) -> TeacherOutput:
        layers = [0] if self.hidden is not None else None
        return TeacherOutput(request_id, self.values, self.indices, "float16", 0.0, self.hidden, layers)


class EchoReplica:
    def __init__(self, handle):
        self.handle = handle

    def submit_topk(self, request_id, input_ids, k, values_dtype="float16", hidden_layers=None):
        return self.handle.topk.remote(request_id, input_ids, k, values_dtype, hidden_layers)


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=0, help="also send one hidden layer of this width")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--prefetch", type=int, default=2)
    args = parser.parse_args()

    connect_ray(None, num_cpus=2)
    echo = EchoReplica(EchoTeacher.remote(args.batch, args.seq_len, args.topk, args.vocab, args.hidden))
    stream = TeacherStream([echo], args.topk, args.prefetch, "float16", 600)
    ids = np.zeros((args.batch, args.seq_len), dtype=np.uint16)
    for _, out in stream.stream(range(5), lambda _: ids):  # warm-up
        out.tensors()
    stream = TeacherStream([echo], args.topk, args.prefetch, "float16", 600)  # fresh counters
    start = time.perf_counter()
    for _, out in stream.stream(range(args.requests), lambda _: ids):
        out.tensors()  # what the student does with a reply: copy into torch tensors
    stream_s = time.perf_counter() - start
    ray.shutdown()

    payload = np.random.default_rng(1).integers(0, 255, stream.stats.bytes // args.requests, dtype=np.uint8)
    target = np.empty_like(payload)
    start = time.perf_counter()
    for _ in range(args.requests):
        np.copyto(target, payload)
    memcpy_s = time.perf_counter() - start

    tokens = args.requests * args.batch * args.seq_len
    return {
        "benchmark": "stream_transport",
        "command": "python benchmarks/transport.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "bytes_per_token": stream.stats.bytes / stream.stats.tokens,
        "stream_tokens_per_s": round(tokens / stream_s),
        "stream_mb_per_s": round(stream.stats.bytes / stream_s / 1e6, 1),
        "memcpy_tokens_per_s": round(tokens / memcpy_s),
        "memcpy_mb_per_s": round(stream.stats.bytes / memcpy_s / 1e6, 1),
        "stream_over_memcpy_time": round(stream_s / memcpy_s, 1),
        "stream_ms_per_request": round(stream_s / args.requests * 1e3, 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
