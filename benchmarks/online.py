"""Online distillation throughput: tokens/s, the share of student time spent waiting on the teacher,
and bytes per token on the stream. Prints one JSON object.

    python benchmarks/online.py                        # the demo composition, 12 steps
    python benchmarks/online.py trainer.max_steps=30 stream.prefetch=4   # any Hydra overrides
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _train import run_train  # benchmarks/_train.py (scripts run with their folder on sys.path)


def main(overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    settings = [
        "trainer.max_steps=12",
        "trainer.eval_every=1000",
        "trainer.checkpoint_every=1000",
        "data.heldout_sequences=2",
        "logger=none",
        *overrides,
        f"run_dir={run_dir}",
    ]
    wall = run_train(settings)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/tokens_per_s" in r][2:]  # skip warm-up steps
    mean = lambda key: sum(r[key] for r in steps) / len(steps)  # noqa: E731
    return {
        "benchmark": "online_distillation",
        "command": " ".join(["python benchmarks/online.py", *overrides]),
        "overrides": settings[:-1],
        "steps_measured": len(steps),
        "tokens_per_s": round(mean("train/tokens_per_s"), 1),
        "teacher_wait_fraction": round(mean("stream/wait_fraction"), 4),
        "bytes_per_token": steps[-1]["stream/bytes_per_token"],
        "wall_s_including_startup": round(wall, 1),
        "run_dir": str(run_dir),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
