"""The teacher host of a Slurm run: `python -m launch.teacher RUN_DIR` (run by the batch script).

Joins the Ray cluster at $DISTILL_RAY_ADDRESS (the head the batch script started on the first teacher
node), starts the run's teacher pool there (with `teachers:`, one pool per named teacher), writes
`teacher.json` (Ray address, namespace, run tag) into the run directory for the student ranks and for
`teacher.attach`, then blocks until `teacher.stop` appears in the run directory or it is terminated, and
shuts the pool down.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import ray

from distill.config import load_run_config
from distill.teacher import connect_ray
from launch.train import start_teachers

log = logging.getLogger("distill")


def wait_for_nodes(expected: int, timeout_s: float = 120) -> None:
    """Wait until every node of the job has joined Ray (teacher workers, student nodes' empty raylets)."""
    deadline = time.monotonic() + timeout_s
    while (alive := sum(n["Alive"] for n in ray.nodes())) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {alive} of {expected} Ray nodes joined within {timeout_s:.0f} s")
        time.sleep(0.5)


def main(run_dir: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="[teacher] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_run_config(run_dir)
    models = json.loads((run_dir / "models.json").read_text())
    stop_file, info_file = run_dir / "teacher.stop", run_dir / "teacher.json"
    stop_file.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the `finally` below

    connect_ray(os.environ.get("DISTILL_RAY_ADDRESS", cfg.ray.address), cfg.ray.namespace)
    wait_for_nodes(int(os.environ.get("DISTILL_RAY_NODES", "1")))
    run_tag = os.environ.get("DISTILL_RUN_TAG") or f"{run_dir.name}-{os.getpid()}-{time.time_ns()}"
    pool = start_teachers(run_tag, models, cfg, run_dir)  # writes teacher_pool.json / teachers.json
    try:
        info = {
            "ray_address": ray.get_runtime_context().gcs_address,
            "namespace": cfg.ray.namespace,
            "run_tag": run_tag,
        }
        tmp = info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.rename(info_file)  # appears complete or not at all
        log.info("teacher pool %s serving at %s", run_tag, info["ray_address"])
        while not stop_file.exists():
            time.sleep(0.5)
    finally:
        info_file.unlink(missing_ok=True)
        pool.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
