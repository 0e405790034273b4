"""Tokenise a corpus once into memory-mapped shards: a folder of text / JSONL / Parquet files of any size
in, Megatron `.bin`/`.idx` shards out, in parallel and resumable.

The work is cut into *pieces* before anything is read: a JSONL file into byte ranges (a line belongs to the
range holding its first byte), a Parquet file into runs of row groups, small text files into groups (one
document per file), each about `shard_bytes` of input. Piece i becomes the shard pair `train/part-<i>` and
`heldout/part-<i>`, whose content depends only on that piece and the tokenizer: the plan is a pure function
of the input files' names and sizes, so any number of worker processes, nodes (Slurm array tasks: piece i
goes to task i mod num_tasks) or restarts produce byte-identical shards. A piece is done when its record
`done/part-<i>.json` (token and document counts, sha256 of its four files) exists; a rerun skips done
pieces and redoes any other from the start. When every piece is done `manifest.json` is written.

A document goes to the held-out split when a keyed hash of its text falls below `heldout_fraction`: the
split needs no global view of the corpus and does not depend on file order or piece boundaries. Each
document is stored with EOS appended (Megatron's `--append-eod`). Memory per worker: one batch of
documents and one int32 per document of the current piece.

A corpus already tokenised by Megatron-LM's `preprocess_data.py` (`.bin`/`.idx` pairs, `format=megatron`,
detected from `.idx` files under `auto`) is imported the same way, without re-tokenising: a piece is a run
of whole documents of one pair (cut at about `shard_bytes` by binary search in its memory-mapped index),
each document's ids are checked against the given tokenizer's vocabulary, get EOS unless they end with it,
and go to the held-out split by a keyed hash of their ids. The import copies the ids once (I/O-bound, no
tokenizer runs), so the result has the same layout, manifest, checksums and held-out split as any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.data.corpus import (
    BUILTIN_CORPORA,
    DataError,
    builtin_documents,
    corpus_files,
    file_format,
    jsonl_documents,
    parquet_documents,
    parquet_file,
)
from distill.data.indexed import IndexedShard, ShardWriter, token_dtype
from distill.files import sha256_file, tokenizer_hash, write_json_atomic

log = logging.getLogger("distill")
FORMAT = "distill-tokens/1"  # Megatron indexed shards + this manifest
SPLITS = ("train", "heldout")
BATCH_DOCS = 256  # documents per tokenizer call (the batch encode's sweet spot on this machine)
BATCH_BYTES = 4 << 20  # ... or fewer, once this much text is gathered


@dataclass(frozen=True)
class TokenizeSpec:
    """What a tokenised dataset is made from; every field is recorded in its plan and manifest."""

    source: str  # a folder or file of .txt/.md/.rst/.jsonl/.parquet or Megatron .bin/.idx, or a builtin name
    tokenizer: str  # a Hugging Face model or tokenizer folder
    format: str = "auto"
    text_field: str = "text"
    heldout_fraction: float = 0.0
    split_seed: int = 0
    shard_bytes: int = 256 << 20  # input bytes per piece (= per shard pair)


# ---- the plan: pieces of input, decided from names and sizes alone ----


def plan_pieces(spec: TokenizeSpec) -> list[dict]:
    """Pieces of input in a fixed order: {"kind", "files" or "file" + range}. Reads no document."""
    if spec.source in BUILTIN_CORPORA:
        return [{"kind": "builtin", "name": spec.source}]
    root = Path(spec.source).expanduser().resolve()
    pieces: list[dict] = []
    texts: list[str] = []
    text_bytes = 0
    for path in corpus_files(root, spec.format):
        fmt = file_format(path, spec.format)
        rel = str(path.relative_to(root)) if root.is_dir() else path.name
        size = path.stat().st_size
        if fmt == "text":  # one document per file: group small files
            texts.append(rel)
            text_bytes += size
            if text_bytes >= spec.shard_bytes:
                pieces.append({"kind": "text", "files": texts})
                texts, text_bytes = [], 0
        elif fmt == "jsonl":
            for start in range(0, max(size, 1), spec.shard_bytes):
                pieces.append(
                    {"kind": "jsonl", "file": rel, "start": start, "end": min(start + spec.shard_bytes, size)}
                )
        elif fmt == "megatron":
            pieces += _megatron_pieces(path.with_suffix(""), rel, spec.shard_bytes)
        else:
            pieces += _parquet_pieces(path, rel, spec.shard_bytes)
    if texts:
        pieces.append({"kind": "text", "files": texts})
    return pieces


def _parquet_pieces(path: Path, rel: str, shard_bytes: int) -> list[dict]:
    meta = parquet_file(path).metadata
    pieces, groups, size = [], [], 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        size += meta.row_group(g).total_byte_size
        if size >= shard_bytes:
            pieces.append({"kind": "parquet", "file": rel, "row_groups": groups})
            groups, size = [], 0
    if groups or not pieces:
        pieces.append({"kind": "parquet", "file": rel, "row_groups": groups})
    return pieces


def _megatron_pieces(prefix: Path, rel: str, shard_bytes: int) -> list[dict]:
    """Runs of whole documents of one Megatron pair, about `shard_bytes` of its `.bin` each, cut by binary
    search in the memory-mapped index: O(log documents) page reads, never the whole index in memory."""
    shard = _megatron_shard(prefix)
    documents = shard.documents - 1
    pointers, starts = shard.pointers(), shard.document_indices()
    cuts = [0]
    for target in range(shard_bytes, shard.num_tokens * shard.dtype.itemsize, shard_bytes):
        sequence = int(np.searchsorted(pointers, target))  # the first sequence starting at or after it
        document = int(np.searchsorted(starts, sequence))  # the first document starting at or after that
        if cuts[-1] < document < documents:
            cuts.append(document)
    cuts.append(documents)
    return [{"kind": "megatron", "file": rel, "documents": [a, b]} for a, b in zip(cuts, cuts[1:])]


def _megatron_shard(prefix: Path) -> IndexedShard:
    """A Megatron pair whose index agrees with its token file (a truncated `.bin` fails here)."""
    try:
        shard = IndexedShard(prefix)
    except (OSError, ValueError) as e:
        raise DataError(f"{prefix}.bin/.idx: not a readable Megatron indexed dataset ({e}).") from None
    if shard.sequences == 0 or shard.documents < 2:
        raise DataError(f"{prefix}.idx holds no documents; drop the empty pair from the corpus.")
    lengths, pointers, starts = shard.lengths(), shard.pointers(), shard.document_indices()
    described = (int(pointers[-1]) + int(lengths[-1]) * shard.dtype.itemsize) // shard.dtype.itemsize
    if described != shard.num_tokens or starts[0] != 0 or starts[-1] != shard.sequences:
        raise DataError(
            f"{prefix}.bin holds {shard.num_tokens} ids but its index describes {described} (or its document "
            f"index is inconsistent): the pair is truncated or mismatched; rewrite it."
        )
    return shard


def _megatron_bounds(shard: IndexedShard, a: int, b: int) -> np.ndarray:
    """Token offsets where documents a, a + 1, ..., b start (b: where the last one ends)."""
    starts = np.array(shard.document_indices()[a : b + 1])
    last = int(starts[-1])
    end = int(shard.pointers()[last]) if last < shard.sequences else shard.num_tokens * shard.dtype.itemsize
    pointers = np.append(np.array(shard.pointers()[starts[0] : last]), end)
    return pointers[starts - starts[0]] // shard.dtype.itemsize


def megatron_documents(prefix: Path, a: int, b: int) -> Iterator[np.ndarray]:
    """Documents [a, b) of a Megatron pair as id arrays (views of the memory map)."""
    shard = _megatron_shard(prefix)
    bounds, tokens = _megatron_bounds(shard, a, b), shard.tokens
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield tokens[start:end]


def input_bytes(spec: TokenizeSpec, piece: dict) -> int:
    """The input bytes a piece covers (progress and ETA count these before any token exists)."""
    root = Path(spec.source).expanduser()
    if piece["kind"] == "builtin":
        return 1
    if piece["kind"] == "jsonl":
        return piece["end"] - piece["start"]
    if piece["kind"] == "megatron":
        shard = IndexedShard(_resolve(root, piece["file"]).with_suffix(""))
        bounds = _megatron_bounds(shard, *piece["documents"])
        return int(bounds[-1] - bounds[0]) * shard.dtype.itemsize
    files = piece.get("files") or [piece["file"]]
    return sum(_resolve(root, f).stat().st_size for f in files)


def _resolve(root: Path, rel: str) -> Path:
    return root / rel if root.is_dir() else root


# ---- reading one piece: documents as a stream ----


def piece_documents(spec: TokenizeSpec, piece: dict) -> Iterator[str | np.ndarray]:
    """The non-empty documents of one piece, in file order, read in bounded batches: text, or for a
    Megatron piece id arrays (already tokenised)."""
    root = Path(spec.source).expanduser().resolve()
    kind = piece["kind"]
    if kind == "builtin":
        yield from (d for d in builtin_documents(piece["name"]) if d.strip())
    elif kind == "text":
        for rel in piece["files"]:
            text = _resolve(root, rel).read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
    elif kind == "megatron":
        prefix = _resolve(root, piece["file"]).with_suffix("")
        yield from (d for d in megatron_documents(prefix, *piece["documents"]) if d.size)
    elif kind == "jsonl":
        yield from jsonl_documents(
            _resolve(root, piece["file"]), piece["start"], piece["end"], spec.text_field
        )
    else:
        yield from parquet_documents(_resolve(root, piece["file"]), piece["row_groups"], spec.text_field)


# ---- one piece -> one shard pair ----


def in_heldout(document: str | np.ndarray, fraction: float, seed: int) -> bool:
    """A keyed hash of the document (its text, or for an already tokenised one its ids' bytes) decides:
    the same document is held out in every run and every piece."""
    if fraction <= 0:
        return False
    data = document.encode("utf-8", "replace") if isinstance(document, str) else document.tobytes()
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def piece_name(i: int) -> str:
    return f"part-{i:05d}"


class BatchEncoder:
    """Text -> ids exactly as the student's Hugging Face tokenizer does with add_special_tokens=False,
    through the `tokenizers` library alone when the folder has a tokenizer.json (what a fast tokenizer
    runs underneath: no transformers or torch import, so a worker starts in a fraction of a second and
    stays small), else through transformers."""

    def __init__(self, folder: str):
        path = Path(folder).expanduser() / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(path))
        else:
            from distill.models import load_tokenizer

            self._fast, self._slow = None, load_tokenizer(folder)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return self._slow(texts, add_special_tokens=False)["input_ids"]


def tokenize_piece(
    spec: TokenizeSpec, out: Path, index: int, piece: dict, encode, identity: dict, progress=None
) -> dict:
    """Write piece `index`'s train and held-out shards and its done record; returns the record.
    `identity`: the plan's tokenizer record (EOS id, id dtype)."""
    eos, dtype = identity["eos_token_id"], identity["dtype"]
    name = piece_name(index)
    writers = {split: ShardWriter(out / split / name, dtype) for split in SPLITS}
    try:
        for batch in _batches(piece_documents(spec, piece)):
            if piece["kind"] == "megatron":  # ids already: checked against the vocabulary, EOS ensured
                encoded = _with_eos(batch, eos, identity["vocab_size"], spec, piece)
            else:
                encoded = [ids + [eos] for ids in encode(batch)]
            for document, ids in zip(batch, encoded):
                split = "heldout" if in_heldout(document, spec.heldout_fraction, spec.split_seed) else "train"
                writers[split].add(ids)
            if progress is not None:
                progress.put(sum(len(ids) for ids in encoded))
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    record = {"piece": index, "name": name}
    for split, writer in writers.items():
        prefix = out / split / name
        record[split] = {
            "tokens": writer.tokens,
            "documents": len(writer.lengths),
            "bin_sha256": sha256_file(prefix.with_suffix(".bin")),
            "idx_sha256": sha256_file(prefix.with_suffix(".idx")),
        }
    write_json_atomic(out / "done" / f"{name}.json", record)
    return record


def _with_eos(batch: list[np.ndarray], eos: int, vocab: int, spec: TokenizeSpec, piece: dict) -> list:
    """Megatron documents as stored here: each ends with EOS (appended unless preprocess_data.py's
    `--append-eod` put it there), every id within the student tokenizer's vocabulary."""
    top = max(int(d.max()) for d in batch)
    if top >= vocab:
        raise DataError(
            f"{Path(spec.source) / piece['file']}: token id {top} is outside the vocabulary of the tokenizer "
            f"given ({spec.tokenizer}, {vocab} ids): this corpus was tokenised with another tokenizer; give "
            f"the one it was made with."
        )
    return [d if d[-1] == eos else np.append(d, np.asarray(eos, d.dtype)) for d in batch]


# ---- the whole job: plan, workers, progress, manifest ----


def _eos_and_vocab(folder: Path) -> tuple[int | None, int]:
    """The EOS id and vocabulary size (added tokens included) of a tokenizer folder: read from
    tokenizer.json + tokenizer_config.json when both say it, else from transformers (slow to import)."""
    config = folder / "tokenizer_config.json"
    eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if (folder / "tokenizer.json").is_file() and isinstance(eos, str):
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
        if fast.token_to_id(eos) is not None:
            return fast.token_to_id(eos), fast.get_vocab_size(with_added_tokens=True)
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(folder)
    return tokenizer.eos_token_id, len(tokenizer)


def tokenizer_identity(folder: str) -> dict:
    """What the shards' ids mean: the tokenizer's content hash, EOS id, vocabulary and id dtype."""
    path = Path(folder).expanduser()
    eos, vocab = _eos_and_vocab(path)
    if eos is None:
        raise DataError(f"the tokenizer in {path} has no eos_token; set one so documents can be separated.")
    return {
        "sha256": tokenizer_hash(path, eos),
        "vocab_size": vocab,
        "eos_token_id": eos,
        "dtype": token_dtype(vocab).name,
    }


def write_plan(spec: TokenizeSpec, out: Path) -> dict:
    """The job's plan (`plan.json`), written once; a rerun must find the same inputs and settings."""
    plan = {
        "format": FORMAT,
        "spec": {k: v for k, v in spec.__dict__.items() if k != "tokenizer"},
        "tokenizer": tokenizer_identity(spec.tokenizer),  # its content: the folder may move
        "pieces": plan_pieces(spec),
    }
    path = out / "plan.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        for key in ("format", "spec", "tokenizer", "pieces"):
            if existing.get(key) != plan[key]:
                raise DataError(
                    f"{out} holds a tokenisation of other inputs or settings ({key} differs: the inputs' "
                    f"names or sizes, the tokenizer, heldout_fraction, split_seed, shard_bytes or the text "
                    f"field changed since it started); rerun with the original settings or pick a new output "
                    f"folder."
                )
        return existing
    if not plan["pieces"]:
        raise DataError(f"{spec.source}: nothing to tokenise (no .txt/.jsonl/.parquet files).")
    for sub in (*SPLITS, "done"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)
    return plan


def done_records(out: Path) -> dict[int, dict]:
    folder = out / "done"
    records = (
        [json.loads(p.read_text()) for p in sorted(folder.glob("part-*.json"))] if folder.is_dir() else []
    )
    return {r["piece"]: r for r in records}


_worker: dict = {}


def _init_worker(folder: str, queue) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _worker.update(encode=BatchEncoder(folder), queue=queue)


def _run_piece(spec: TokenizeSpec, out: Path, index: int, piece: dict, identity: dict) -> int:
    tokenize_piece(spec, out, index, piece, _worker["encode"], identity, _worker["queue"])
    return index


class _Progress:
    """Tokens done, tokens/s and ETA (ETA from the input bytes still to read) on the console."""

    def __init__(self, total_bytes: int, every_s: float = 5.0):
        self.total_bytes, self.every_s = total_bytes, every_s
        self.tokens, self.bytes_done, self.start, self.last = 0, 0, time.perf_counter(), 0.0

    def add(self, tokens: int = 0, piece_bytes: int = 0, force: bool = False) -> None:
        self.tokens += tokens
        self.bytes_done += piece_bytes
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.tokens / max(now - self.start, 1e-9)
        left = (self.total_bytes - self.bytes_done) / max(self.bytes_done, 1) * (now - self.start)
        eta = f"{left:.0f}s" if self.bytes_done else "?"
        log.info(
            "tokenised %d tokens | %.0f tok/s | input %.1f%% | eta %s",
            self.tokens,
            rate,
            100 * self.bytes_done / max(self.total_bytes, 1),
            eta,
        )


def tokenize(
    spec: TokenizeSpec, out: Path, workers: int = 1, task: int = 0, num_tasks: int = 1
) -> dict | None:
    """Tokenise this task's pending pieces with `workers` processes; write the manifest once every piece
    is done (by whichever task finishes last). Returns the manifest, or None while other tasks still run."""
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = write_plan(spec, out)
    pieces = plan["pieces"]
    done = done_records(out)
    mine = [i for i in range(len(pieces)) if i % num_tasks == task and i not in done]
    if done:
        log.info("%s: %d of %d pieces already done; tokenising %d", out, len(done), len(pieces), len(mine))
    for i in mine:  # partial files of a killed run (only this task writes these pieces)
        for split in SPLITS:
            for stray in (out / split).glob(f".{piece_name(i)}.*.tmp"):
                stray.unlink()
    progress = _Progress(sum(input_bytes(spec, pieces[i]) for i in mine))
    if mine and workers <= 1:
        encode = BatchEncoder(spec.tokenizer)

        class _Direct:
            def put(self, n: int) -> None:
                progress.add(tokens=n)

        for i in mine:
            tokenize_piece(spec, out, i, pieces[i], encode, plan["tokenizer"], _Direct())
            progress.add(piece_bytes=input_bytes(spec, pieces[i]))
    elif mine:
        ctx = mp.get_context("spawn")  # fork after a fast tokenizer was used can deadlock
        queue = ctx.Queue()
        initargs = (spec.tokenizer, queue)
        with ProcessPoolExecutor(min(workers, len(mine)), ctx, _init_worker, initargs) as pool:
            futures = {pool.submit(_run_piece, spec, out, i, pieces[i], plan["tokenizer"]): i for i in mine}
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in finished:
                        future.result()  # a worker's error (a bad line, say) surfaces here
                        progress.add(piece_bytes=input_bytes(spec, pieces[futures[future]]))
                    while not queue.empty():
                        progress.add(tokens=queue.get())
            except BrokenProcessPool:
                raise RuntimeError(
                    f"a tokeniser worker died (killed by the system: out of memory?) while writing {out}; "
                    f"every finished shard is kept: rerun the same command to continue (with fewer workers "
                    f"or a smaller shard_bytes if memory is short)."
                ) from None
    progress.add(force=True)
    done = done_records(out)
    if len(done) < len(pieces):
        log.info("%d of %d pieces done; the last task to finish writes the manifest", len(done), len(pieces))
        return None
    if not any(r[split]["documents"] for r in done.values() for split in SPLITS):
        raise DataError(f"source={spec.source!r} holds no text: every document is empty.")
    return write_manifest(out, plan, done)


def write_manifest(out: Path, plan: dict, done: dict[int, dict]) -> dict:
    """manifest.json: the plan's identity plus every shard's counts and checksums, in piece order.
    Deterministic: a resumed job writes the same bytes as an uninterrupted one."""
    shards = {
        split: [{"name": f"{split}/{done[i]['name']}", **done[i][split]} for i in sorted(done)]
        for split in SPLITS
    }
    manifest = {
        "format": FORMAT,
        "spec": plan["spec"],
        "tokenizer": plan["tokenizer"],
        "totals": {
            split: {
                "tokens": sum(s["tokens"] for s in shards[split]),
                "documents": sum(s["documents"] for s in shards[split]),
            }
            for split in SPLITS
        },
        "shards": shards,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
