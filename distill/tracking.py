"""Where metrics go: a JSONL file in the run directory, W&B (offline by default) and the console."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

log = logging.getLogger("distill")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RunLogger:
    """Rank 0's metrics sink. `log(step, metrics)` appends one JSON line and forwards to W&B."""

    def __init__(self, run_dir: Path, logger_cfg, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        if logger_cfg.backend == "wandb" and logger_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=logger_cfg.project,
                group=logger_cfg.group,
                name=logger_cfg.name or run_dir.name,
                mode=logger_cfg.mode,
                dir=str(run_dir),
                config=config,
                resume="allow",
                id=wandb_run_id(run_dir),
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self, summary: dict | None = None) -> None:
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(summary)
            self.wandb.finish()


def wandb_run_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    id_file = run_dir / "wandb_run_id.txt"
    if id_file.exists():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)
    id_file.write_text(run_id)
    return run_id


class Progress:
    """Console progress: step, loss, tokens/s and ETA, printed every `every` steps."""

    def __init__(self, total_steps: int, start_step: int, every: int):
        self.total, self.every = total_steps, every
        self.start_step, self.start_time = start_step, time.perf_counter()

    def update(self, step: int, metrics: dict) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | teacher wait %.0f%% | eta %s",
            step,
            self.total,
            metrics["train/loss"],
            metrics["train/lr"],
            metrics["train/tokens_per_s"],
            100 * metrics["stream/wait_fraction"],
            _fmt_duration(eta),
        )


class TokenProgress:
    """Console progress of a job counted in tokens (writing a teacher cache): done, tokens/s and ETA,
    printed at most every `every_s` seconds and when the job is done."""

    def __init__(self, total: int, done: int = 0, every_s: float = 5.0, what: str = "tokens"):
        self.total, self.done, self.every_s, self.what = total, done, every_s, what
        self.start_done, self.start_time, self.last_print = done, time.perf_counter(), 0.0

    def update(self, tokens: int) -> None:
        self.done += tokens
        now = time.perf_counter()
        if now - self.last_print < self.every_s and self.done < self.total:
            return
        self.last_print = now
        rate = (self.done - self.start_done) / max(now - self.start_time, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        log.info(
            "%s %d/%d (%.1f%%) | %.0f tok/s | eta %s",
            self.what,
            self.done,
            self.total,
            100 * self.done / max(1, self.total),
            rate,
            _fmt_duration(eta),
        )
