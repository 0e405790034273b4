"""Files the project writes and checks: sha256 digests (remembered for large files), atomic JSON writes,
and the tokenizer's identity. The lowest layer: data, cache and checkpoints all use it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Files that define how text becomes ids. tokenizer_config.json is left out: save_pretrained rewrites it
# (a student cut from a teacher has a different one) while the ids it produces stay the same.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


def default_cache_dir() -> Path:
    """``$DISTILL_CACHE`` or ``~/.cache/distill``: converted models, tokenised corpora, file hashes."""
    return Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill").expanduser()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(paths: list[Path]) -> str:
    """One sha256 over the contents of `paths`, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered by path, size and mtime in $DISTILL_CACHE/file-hashes.json so
    the teacher's weights are hashed once, not on every cache run."""
    path = path.resolve()
    stat = path.stat()
    memo_file = default_cache_dir() / "file-hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key, seen = str(path), [stat.st_size, stat.st_mtime_ns]
    if key in memo and memo[key][:2] == seen:
        return memo[key][2]
    digest = sha256_file(path)
    memo[key] = [*seen, digest]
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(memo_file, memo)  # concurrent writers: the last one wins, every entry stays true
    return digest


def hash_files(files: list[Path], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for f in files:
        digest.update(f"{f.name}:{cached_sha256(f)}\n".encode())
    return digest.hexdigest()


def tokenizer_hash(model_dir: Path, eos_token_id: int | None) -> str:
    """sha256 of the tokenizer's defining files plus the EOS id that packing puts between documents."""
    files = sorted(p for name in TOKENIZER_FILES if (p := Path(model_dir) / name).is_file())
    if not files:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {model_dir}")
    return hash_files(files, extra=f"eos={eos_token_id}\n")


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary name, flush to disk, rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
