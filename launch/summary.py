"""`python -m launch.summary RUN_DIR`: write and print a finished run's summary (last Slurm step), and with
report.enabled in the run's config.yaml its evaluation report (<run_dir>/report)."""

import sys
from pathlib import Path

from omegaconf import OmegaConf

from distill.report.report import report_training_run
from launch.train import print_summary, summarize

if __name__ == "__main__":
    run_dir = Path(sys.argv[1]).resolve()
    summary = summarize(run_dir)
    print_summary(summary)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.get("report", {}).get("enabled") and summary["student"]:
        print(f"report: {report_training_run(cfg, run_dir, f'python -m launch.summary {run_dir}')}")
