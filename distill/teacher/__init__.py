"""Teacher service: Ray actors that host a causal LM and answer with its top-k log-probs.

`TeacherPool` and `connect_ray` are imported on first use (module `__getattr__`), so importing this package
for `TeacherOutput` (the cache reader, the ensemble code) does not import Ray: a `teacher=cached` or
teacher-less rank runs where Ray is not installed.
"""

from __future__ import annotations

from typing import Any

from distill.teacher.actor import TeacherActor, TeacherOutput, index_dtype

__all__ = ["TeacherActor", "TeacherOutput", "TeacherPool", "connect_ray", "index_dtype"]


def __getattr__(name: str) -> Any:
    if name in ("TeacherPool", "connect_ray"):
        from distill.teacher import pool

        return getattr(pool, name)
    raise AttributeError(f"module 'distill.teacher' has no attribute {name!r}")
