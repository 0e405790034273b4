"""The cache's manifest (manifest.json): what the cached signals were computed from, and its shards.

A cache is only valid for a run that trains on the same token arrays with the same tokenizer, sequence
length and at most its top-k; `check_run` refuses anything else before compute starts, naming the field
and the fix. The manifest is rewritten atomically after every shard, so it lists only complete shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distill.files import hash_files

FORMAT = "distill-teacher-cache/1"
MANIFEST = "manifest.json"


class CacheError(ValueError):
    """A cache that cannot be used for this run (or a damaged one); the message names the fix."""


def weights_hash(model_dir: Path) -> str:
    """sha256 over the teacher's weight files (name and content hash of each)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.bin"))
    if not files:
        raise CacheError(f"no weight files (*.safetensors) in the teacher folder {model_dir}")
    return hash_files(files)


SHARD_LOG = "shards.jsonl"  # one line per shard written, appended while the cache is being written


def read_manifest(cache_dir: Path) -> dict:
    """The manifest, with the shards of an unfinished cache read from its append-only shard log (the
    manifest itself is written twice: when the cache starts and when it is complete)."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{path} does not exist: {cache_dir} is not a teacher cache; write one with "
            f"`python -m launch.cache cache.path={cache_dir} ...` (same teacher/data/stream settings)."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; rewrite the cache.")
    if not manifest["complete"]:
        manifest["shards"] = read_shard_log(Path(cache_dir))
    return manifest


def read_shard_log(cache_dir: Path) -> list[dict]:
    """The shards listed in `shards.jsonl`; a last line cut short by a kill is not a shard."""
    log = cache_dir / SHARD_LOG
    shards = []
    for line in log.read_text().splitlines(keepends=True) if log.is_file() else []:
        if line.endswith("\n"):
            shards.append(json.loads(line))
    return shards


# The fields that identify what a cache holds; a resumed writer must match them all.
IDENTITY = (
    "format",
    "teacher",
    "tokenizer",
    "seq_len",
    "k",
    "values",
    "hidden",
    "index_dtype",
    "data",
    "shard_sequences",
    "signals",  # "generation": converted from launch.generate's stored top-k; absent: the live teacher
    "document_isolation",  # whether the teacher kept packed documents apart (distill/documents.py)
    "codec",  # cache.codec: how each row's top-k is packed (distill/codecs.py)
    "sparsifier",  # stream.sparsifier / samples / seed of the signals (distill/teacher/sparsify.py)
)
# What a field absent from an older manifest means (caches written before the field existed)
DEFAULTS = {"document_isolation": False, "codec": "none", "sparsifier": {"kind": "topk", "samples": 0}}


def check_same_cache(existing: dict, wanted: dict, cache_dir: Path) -> None:
    """A cache run resuming into `cache_dir` must be writing the same cache it was started for."""
    for field in IDENTITY:
        had, now = existing.get(field, DEFAULTS.get(field)), wanted.get(field, DEFAULTS.get(field))
        if had != now:
            raise CacheError(
                f"{cache_dir} holds a cache with a different {field} ({had!r}, now {now!r}); resume with "
                "the original settings or write to a new cache.path."
            )


def row_digests(tokens) -> list[str]:
    """A short sha256 per sequence: held-out sets are matched row by row (a run with more ranks may
    evaluate fewer of them, trimmed to a multiple of the ranks)."""
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in tokens]


def check_run(
    manifest: dict,
    cache_dir: Path,
    *,
    tokenizer: str,
    seq_len: int,
    topk: int,
    train_digest: str,
    heldout_rows: list[str],
    hidden_layers: list[int] | None,
    document_isolation: bool = False,
    sparsifier: dict | None = None,
) -> None:
    """Refuse a cache that does not fit the run: the message names the field and the fix.

    k: a cache of top-K serves any stream.topk <= K (top-k is sorted, so its first stream.topk entries are
    the top-stream.topk); a larger stream.topk would need signals the cache does not have. Sampled
    signals (`sparsifier` {"kind", "samples"}) serve only the same scheme, k and number of draws.
    """
    fix = "write a cache for this run with `python -m launch.cache cache.path=<new> ...` or change the run"
    if not manifest.get("complete"):
        raise CacheError(
            f"the cache {cache_dir} is incomplete ({len(manifest['shards'])} shards written); finish it by "
            f"rerunning the same `python -m launch.cache` command (it resumes)."
        )
    if manifest["tokenizer"] != tokenizer:
        raise CacheError(
            f"cache tokenizer mismatch: {cache_dir} was tokenized with another tokenizer (hash "
            f"{manifest['tokenizer'][:12]}, the student's is {tokenizer[:12]}); {fix}."
        )
    if manifest["seq_len"] != seq_len:
        raise CacheError(
            f"cache seq_len mismatch: {cache_dir} holds sequences of {manifest['seq_len']} tokens, the run "
            f"uses data.seq_len={seq_len}; set data.seq_len={manifest['seq_len']} or {fix}."
        )
    stored = manifest.get("sparsifier", DEFAULTS["sparsifier"])
    wanted = sparsifier or DEFAULTS["sparsifier"]
    if (stored["kind"], stored["samples"]) != (wanted["kind"], wanted["samples"]) or (
        stored["kind"] != "topk" and manifest["k"] != topk
    ):
        raise CacheError(
            f"cache sparsifier mismatch: {cache_dir} holds stream.sparsifier={stored['kind']} "
            f"stream.samples={stored['samples']} stream.topk={manifest['k']}, the run asks for "
            f"stream.sparsifier={wanted['kind']} stream.samples={wanted['samples']} stream.topk={topk}; set "
            f"those or {fix}."
        )
    if manifest["k"] < topk:
        raise CacheError(
            f"cache k mismatch: {cache_dir} holds the teacher's top-{manifest['k']}, the run asks for "
            f"stream.topk={topk}; set stream.topk<={manifest['k']} or {fix}."
        )
    data = manifest["data"]
    if data["train"]["sha256"] != train_digest or not set(heldout_rows) <= set(data["heldout"]["row_sha256"]):
        split = "train" if data["train"]["sha256"] != train_digest else "heldout"
        raise CacheError(
            f"cache dataset mismatch: the run's {split} sequences differ from those in {cache_dir}; use the "
            f"data settings the cache was written with (data_config in {cache_dir / MANIFEST}) or {fix}."
        )
    kept_apart = manifest.get("document_isolation", DEFAULTS["document_isolation"])
    if kept_apart != document_isolation:
        said = "kept packed documents apart" if kept_apart else "let packed documents attend to each other"
        raise CacheError(
            f"cache document isolation mismatch: the teacher that wrote {cache_dir} {said} "
            f"(data.document_isolation={str(kept_apart).lower()}), the run sets "
            f"data.document_isolation={str(document_isolation).lower()}, so the student and the teacher "
            f"would see different contexts; set data.document_isolation={str(kept_apart).lower()} or {fix}."
        )
    stored = manifest["hidden"]["layers"] if manifest["hidden"] else []
    missing = sorted(set(hidden_layers or ()) - set(stored))
    if missing:
        raise CacheError(
            f"cache hidden_layers mismatch: features.layer_map needs teacher layers {missing}, which "
            f"{cache_dir} does not store (it has {stored}); write a cache with cache.hidden_layers including "
            f"them."
        )
