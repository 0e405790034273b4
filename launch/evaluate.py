"""Evaluate distilled students against their teacher, one report: `python -m launch.evaluate
teacher=local teacher.model.name_or_path=/models/teacher 'students=[/runs/a/student,/runs/b/student]'`
(console script `distill-evaluate`; keys: conf/evaluate.yaml, EvaluateConfig and ReportConfig in
distill/config.py; what is measured: distill/report/report.py).

Writes report_dir/metrics.json (every number, the command line, the machine), report.md (the tables),
quality_vs_size.png and quality_vs_speed.png, and the same tables and plots to W&B (logger=wandb, offline by
default). Bad input (no students, a student folder that does not exist or has no config.json, an unknown
task, an empty prompts file, ...) is refused with one `error:` line and exit code 2 before any model loads,
and no report is written.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distill.config import register_configs
from distill.report.document import write
from distill.report.report import evaluate
from launch.errors import reported_errors

register_configs()
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="evaluate", version_base="1.3")
@reported_errors  # bad input: one `error: ...` line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> dict:
    report = evaluate(cfg, shlex.join(["python", "-m", "launch.evaluate", *sys.argv[1:]]))
    print(write(report, Path(cfg.report_dir), cfg.logger))
    print(
        f"report: {Path(cfg.report_dir) / 'report.md'}, all numbers: {Path(cfg.report_dir) / 'metrics.json'}"
    )
    return report


if __name__ == "__main__":
    main()
