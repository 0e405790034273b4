"""Preemption of a locally driven run: SIGUSR1 to `launch.train` (Slurm's warning, `kill -USR1 <pid>`).

The driver remembers the signal and passes it on to its ranks (they run in their own sessions, so no signal
sent to the driver or its terminal reaches them); each rank checkpoints at the next step boundary and exits
with PREEMPTED_EXIT, and the driver shuts its teachers down and exits with PREEMPTED_EXIT too. Its own
module because `launch.train` runs as `__main__` and `launch.curriculum` imports it again: state kept in
`launch.train` would exist twice.
"""

from __future__ import annotations

from pathlib import Path

from distill.student import checkpoint


class Preempted(Exception):
    """SIGUSR1 reached the driver: the ranks checkpointed and stopped (or had not started training)."""

    def __init__(self, step: int, phase: str | None = None):
        self.step, self.phase = step, phase
        where = f" of phase {phase}" if phase else ""
        super().__init__(f"preempted at step {step}{where}; rerun the same command with trainer.resume=auto")


class Preemption:
    """The driver's SIGUSR1 handler: remembers the request; `launch_ranks` forwards it to the ranks."""

    requested = False

    def request(self, *_) -> None:
        self.requested = True

    def check(self, run_dir: Path) -> None:
        """Stop before starting teachers or ranks once a preemption was requested."""
        if self.requested:
            raise Preempted(checkpointed_step(run_dir))


def checkpointed_step(run_dir: Path) -> int:
    found = checkpoint.latest(run_dir / "checkpoints")
    return int(found.name.removeprefix("step-")) if found else 0


PREEMPTION = Preemption()  # launch.train's main() makes it the SIGUSR1 handler
