"""What the benchmarks that train share: one `launch.train` run through the CLI, as a user starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_train(settings: list[str]) -> float:
    """Run `python -m launch.train *settings` from the repository root (W&B offline, output discarded);
    raise if it fails; return its wall-clock seconds."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "launch.train", *settings],
        cwd=ROOT,
        check=True,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start
