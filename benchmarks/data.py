"""The data path at scale, measured: tokeniser throughput against the tokenizer's own batch encode, peak
memory across corpus sizes, and the per-step cost of sampling + reading windows from a 10^10-token index.

    python benchmarks/data.py throughput [--mb 40]       # tok/s per worker vs raw encode; 1 vs 2 workers
    python benchmarks/data.py memory --sizes-mb 100 500  # peak RSS: tokenise; prepare + one training step
    python benchmarks/data.py loader [--tokens 1e10]     # ms per global batch per rank; sampler memory

The corpus is real prose: Python's documentation topics (pydoc_data), replicated as JSONL to the size
asked. The tokenizer is the demo student's (SmolLM2's 49,152-token BPE). Each subcommand prints one JSON
object with the command that reproduces it and the machine's load average during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's distill, not whichever one is installed


def corpus(path: Path, megabytes: float) -> Path:
    """JSONL of pydoc topics replicated to about `megabytes` MB (whole documents)."""
    from distill.data import load_documents

    block = "".join(json.dumps({"text": d}) + "\n" for d in load_documents("pydoc_topics")).encode()
    with open(path, "wb") as f:
        while f.tell() < megabytes * 1e6:
            f.write(block)
    return path


def tokenizer_dir() -> str:
    from distill.models import smollm2_folder

    return str(smollm2_folder())


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_child(args: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB, largest process of the tree) of `python args...`."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    wall, rss_kb = out.stdout.split()
    return float(wall), int(rss_kb) // 1024


def throughput(args) -> dict:
    """Raw single-thread `encode_batch` on the documents in memory vs the tokeniser (reading, hashing the
    split, writing shards) with 1 and 2 worker processes, each single-threaded."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    from distill.data import load_documents

    tmp = Path(tempfile.mkdtemp())
    try:
        path = corpus(tmp / "corpus.jsonl", args.mb)
        docs = load_documents(str(path))
        raw = Tokenizer.from_file(f"{tokenizer_dir()}/tokenizer.json")
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(docs), 256):
            tokens += sum(len(e.ids) for e in raw.encode_batch(docs[i : i + 256], add_special_tokens=False))
        raw_rate = tokens / (time.perf_counter() - start)
        del docs
        rates = {}
        shard = max(1 << 20, int(args.mb * 1e6 / 8))  # 8 pieces: both workers stay busy
        for workers in (1, 2):
            out = tmp / f"out{workers}"
            wall, _ = run_child(
                [
                    "-m",
                    "launch.tokenize",
                    f"source={path}",
                    f"out={out}",
                    f"tokenizer={tokenizer_dir()}",
                    f"workers={workers}",
                    f"shard_bytes={shard}",
                ],
                {"TOKENIZERS_PARALLELISM": "false"},
            )
            totals = json.loads((out / "manifest.json").read_text())["totals"]
            rates[workers] = (totals["train"]["tokens"] + totals["heldout"]["tokens"]) / wall
        return {
            "benchmark": "tokenise throughput",
            "command": f"python benchmarks/data.py throughput --mb {args.mb}",
            "corpus_mb": round(path.stat().st_size / 1e6, 1),
            "raw_encode_batch_tok_s": round(raw_rate),
            "tokenise_1_worker_tok_s": round(rates[1]),
            "tokenise_2_workers_tok_s": round(rates[2]),
            "per_worker_vs_raw": round(rates[1] / raw_rate, 3),
            "speedup_2_vs_1": round(rates[2] / rates[1], 3),
            "note": "wall time of the whole command, start-up included; one thread per process",
            "load_average": load(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def memory(args) -> dict:
    """Peak RSS of tokenising corpora of several sizes, and of `prepare` + a one-step training run on the
    result (teacher.source=none, the pruned SmolLM2 student, 1 rank) reading the shards."""
    rows = []
    for mb in args.sizes_mb:
        tmp = Path(tempfile.mkdtemp())
        try:
            path = corpus(tmp / "corpus.jsonl", mb)
            out = tmp / "tokens"
            wall, tok_rss = run_child(
                [
                    "-m",
                    "launch.tokenize",
                    f"source={path}",
                    f"out={out}",
                    f"tokenizer={tokenizer_dir()}",
                    "workers=2",
                    "shard_bytes=33554432",
                ]
            )
            tokens = json.loads((out / "manifest.json").read_text())["totals"]["train"]["tokens"]
            train_wall, train_rss = run_child(
                [
                    "-m",
                    "launch.train",
                    "teacher=none",
                    f"data.source={out}",
                    "data.seq_len=256",
                    f"run_dir={tmp / 'run'}",
                    "trainer.num_ranks=1",
                    "trainer.max_steps=1",
                    "trainer.eval_every=1000",
                    "data.heldout_sequences=4",
                    "logger=none",
                    "trainer.zero_stage=0",
                ]
            )
            rows.append(
                {
                    "corpus_mb": round(path.stat().st_size / 1e6),
                    "train_tokens": tokens,
                    "tokenise_s": round(wall, 1),
                    "tokenise_peak_rss_mb": tok_rss,
                    "train_1_step_s": round(train_wall, 1),
                    "prepare_and_step_peak_rss_mb": train_rss,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "benchmark": "peak memory across corpus sizes",
        "command": "python benchmarks/data.py memory --sizes-mb " + " ".join(map(str, args.sizes_mb)),
        "rows": rows,
        "note": "peak RSS of the largest process (tokeniser: parent or a worker; training: driver or rank)",
        "load_average": load(),
    }


def loader(args) -> dict:
    """Sampler + window reads per global batch on a sparse 10^10-token shard set, against a small one:
    time per step per rank and the sampler's peak Python memory (tracemalloc)."""
    import tracemalloc

    from distill.data.indexed import ShardWriter
    from distill.data.sampler import StepSampler
    from distill.data.shards import Windows

    tmp = Path(tempfile.mkdtemp())
    seq_len, micro, accum, ranks = 4096, 4, 8, 1000  # a global batch of 32,000 windows (131M tokens)
    try:
        results = {}
        for label, total in (("small", 10**9), ("large", int(args.tokens))):
            prefixes, sizes = [], []
            per_shard = 2 * 10**9  # documents' int32 lengths cap a shard below 2^31 tokens
            for i in range(-(-total // per_shard)):
                n = min(per_shard, total - i * per_shard)
                prefix = tmp / f"{label}-{i}"
                writer = ShardWriter(prefix, np.uint16)
                writer.lengths.append(
                    n
                )  # one document of n tokens: the .bin below is sparse (no bytes written)
                writer.finish()
                os.truncate(prefix.with_suffix(".bin"), n * 2)
                prefixes.append(prefix)
                sizes.append(n)
            windows = Windows(prefixes, sizes, seq_len)
            sampler = StepSampler(len(windows), micro, accum, ranks, rank=7, seed=0)
            tracemalloc.start()
            sampler.micro_batches(0)
            sample_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            steps, repeats = 1000, 5  # a step is ~1 ms: repeat, and report the median and the best
            times = []
            for r in range(repeats):
                start = time.perf_counter()
                for step in range(r * steps, (r + 1) * steps):
                    for idx in sampler.micro_batches(step):
                        windows.read(idx)
                times.append((time.perf_counter() - start) / steps * 1e3)
            results[label] = {
                "tokens": total,
                "windows": len(windows),
                "ms_per_global_batch_per_rank": round(float(np.median(times)), 3),
                "ms_best_of_5": round(min(times), 3),
                "sampler_peak_bytes": sample_peak,
            }
        return {
            "benchmark": "data loader per global batch",
            "command": f"python benchmarks/data.py loader --tokens {args.tokens:g}",
            "geometry": {"seq_len": seq_len, "micro_batch": micro, "grad_accum": accum, "ranks": ranks},
            **results,
            "load_average": load(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("throughput").add_argument("--mb", type=float, default=40)
    sub.add_parser("memory").add_argument("--sizes-mb", type=float, nargs="+", default=[100, 500])
    sub.add_parser("loader").add_argument("--tokens", type=float, default=1e10)
    args = parser.parse_args()
    return {"throughput": throughput, "memory": memory, "loader": loader}[args.what](args)


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
