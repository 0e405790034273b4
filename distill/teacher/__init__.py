"""Teacher service: Ray actors that host a causal LM and answer with its top-k log-probs."""

from distill.teacher.actor import TeacherActor, TeacherOutput, index_dtype
from distill.teacher.pool import TeacherPool, connect_ray

__all__ = ["TeacherActor", "TeacherOutput", "TeacherPool", "connect_ray", "index_dtype"]
