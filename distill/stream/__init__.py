"""Stream client: overlaps teacher requests with student compute."""

from distill.stream.client import StreamStats, TeacherStream

__all__ = ["StreamStats", "TeacherStream"]
