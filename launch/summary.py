"""`python -m launch.summary RUN_DIR`: write and print a finished run's summary (last Slurm step)."""

import sys
from pathlib import Path

from launch.train import print_summary, summarize

if __name__ == "__main__":
    print_summary(summarize(Path(sys.argv[1]).resolve()))
