"""Expected user errors at the command line: one clear message on stderr and exit code 2, no traceback.

Bad input (a config key, a data file, a model folder, a tokenizer, a teacher cache, a checkpoint, a run
directory) raises one of the project's error types, whose message names the file or key, the problem and
the fix; a traceback adds nothing for the user. `HYDRA_FULL_ERROR=1`, Hydra's own switch for full stack
traces, shows it as well. Used by the Hydra mains (`launch.train`, `launch.cache`, `launch.generate`).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

USER_ERROR_EXIT = 2  # bad input: nothing was computed; fix the named file or key and rerun


def user_error_types() -> tuple[type[Exception], ...]:
    """The exception types whose message is the whole story (imported lazily: they live in heavy modules)."""
    from distill.cache.manifest import CacheError
    from distill.config import ConfigError
    from distill.data import DataError
    from distill.models import ModelConfigError
    from distill.student.checkpoint import CheckpointError

    return ConfigError, DataError, ModelConfigError, CacheError, CheckpointError


def show_traceback() -> bool:
    """`HYDRA_FULL_ERROR=1`: let expected errors propagate with their full traceback (for debugging)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: object, code: int = USER_ERROR_EXIT) -> None:
    """Print `error: <message>` to stderr and exit with `code`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def reported_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a command's main: an expected user error becomes one `error: ...` line on stderr and exit
    code 2 (unless `HYDRA_FULL_ERROR=1`); anything else propagates with its traceback, as a bug should.

    A plain function wrapper, not a `contextlib.contextmanager` used as a decorator: that one closes over
    a generator, which submitit's cloudpickle cannot pickle when Hydra multirun submits `main` to Slurm."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except user_error_types() as exc:
            if show_traceback():
                raise
            fail(exc)
            raise  # unreachable: fail() exits

    return wrapper
