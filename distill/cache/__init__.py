"""The offline teacher-signal cache: write once (`python -m launch.cache`), train any number of times
(`teacher=cached cache.path=...`) with no teacher and no Ray."""

from distill.cache.manifest import CacheError, check_run, read_manifest, row_digests
from distill.cache.reader import CachedTeacher, teacher_folder
from distill.cache.writer import CacheWriter
from distill.files import tokenizer_hash

__all__ = [
    "CacheError",
    "CacheWriter",
    "CachedTeacher",
    "check_run",
    "read_manifest",
    "row_digests",
    "teacher_folder",
    "tokenizer_hash",
]
