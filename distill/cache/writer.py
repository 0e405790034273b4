"""Write a teacher-signal cache: shards of rows, each complete before the shard log names it.

A shard is written to a temporary name, flushed, hashed and renamed; only then is one line appended to
`shards.jsonl` (flushed to disk), so the cost per shard does not grow with the number of shards. The
manifest is written when the cache starts and, with every shard listed, when it is complete. A killed
run therefore leaves complete listed shards plus at most one stray temporary file (and perhaps a cut
last log line), which the next run drops before continuing with the first unlisted shard.

Held-out rows get what evaluation needs: top-k, plus the teacher's log-prob of each actual next token
(from its full distribution, one sequence per request). Training rows get top-k (and hidden states of
`cache.hidden_layers`) through the same TeacherStream as online training: replicas and pipeline stages
work unchanged, `stream.prefetch` requests in flight.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from distill.cache.codec import encode_rows, encode_values
from distill.cache.manifest import MANIFEST, SHARD_LOG, CacheError, check_same_cache, read_manifest
from distill.eval import eval_chunks
from distill.files import sha256_file, write_json_atomic
from distill.teacher.actor import _to_numpy, index_dtype

SPLITS = ("heldout", "train")  # held-out first: small, and evaluation needs it from step 0
TEACHER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
)


def shard_plan(rows: dict[str, int], shard_sequences: int) -> list[tuple[str, int, int]]:
    """(split, first row, end row) of every shard, in writing order."""
    return [
        (split, start, min(start + shard_sequences, rows[split]))
        for split in SPLITS
        for start in range(0, rows[split], shard_sequences)
    ]


def hidden_dtype(values: str) -> str:
    """Hidden states are stored in the values' float type; with int8 values, in float16."""
    return "float16" if values == "int8" else values


class CacheWriter:
    """Appends shards to `cache_dir`; resumes a cache started with the same identity."""

    def __init__(self, cache_dir: Path, identity: dict, extra: dict, teacher_dir: Path):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stray in self.dir.glob("*.tmp"):  # a shard (or manifest) a killed run did not finish
            if stray.is_file():
                stray.unlink()
        if (self.dir / MANIFEST).exists():
            self.manifest = read_manifest(self.dir)
            check_same_cache(self.manifest, identity, self.dir)
            if not self.manifest["complete"]:  # drop a log line a kill cut short
                log = "".join(json.dumps(shard) + "\n" for shard in self.manifest["shards"])
                (self.dir / f"{SHARD_LOG}.tmp").write_text(log)
                (self.dir / f"{SHARD_LOG}.tmp").replace(self.dir / SHARD_LOG)
            for shard in self.manifest["shards"]:
                if not (self.dir / shard["file"]).is_file():
                    raise CacheError(
                        f"{self.dir / shard['file']} is listed in the manifest but missing; "
                        f"write the cache to a new cache.path."
                    )
        else:
            self.manifest = {**identity, **extra, "shards": [], "complete": False}
            self._save()
        self._copy_teacher_files(Path(teacher_dir))

    def _copy_teacher_files(self, teacher_dir: Path) -> None:
        """The teacher's config and tokenizer (no weights): training checks vocabulary and layers on them."""
        out = self.dir / "teacher"
        if out.is_dir():
            return
        tmp = self.dir / "teacher.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in TEACHER_FILES:
            if (teacher_dir / name).is_file():
                shutil.copy2(teacher_dir / name, tmp / name)
        tmp.rename(out)

    def _save(self) -> None:
        write_json_atomic(self.dir / MANIFEST, self.manifest)

    def written(self) -> set[tuple[str, int]]:
        return {(s["split"], s["start"]) for s in self.manifest["shards"]}

    def write_shard(self, split: str, start: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"{split}-{start:09d}.safetensors"
        tmp = self.dir / f"{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"split": split})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        tmp.rename(self.dir / name)
        size, rows = (self.dir / name).stat().st_size, len(tensors["input_ids"])
        shard = {"file": name, "split": split, "start": start, "rows": rows, "bytes": size, "sha256": digest}
        self.manifest["shards"].append(shard)
        with open(self.dir / SHARD_LOG, "a") as log:
            log.write(json.dumps(shard) + "\n")
            log.flush()
            os.fsync(log.fileno())

    def finish(self) -> dict:
        """Mark the cache complete; returns its size summary."""
        train = [s for s in self.manifest["shards"] if s["split"] == "train"]
        tokens = sum(s["rows"] for s in train) * self.manifest["seq_len"]
        self.manifest["train_bytes_per_token"] = sum(s["bytes"] for s in train) / max(1, tokens)
        self.manifest["complete"] = True
        self._save()
        return {"train_tokens": tokens, "train_bytes_per_token": self.manifest["train_bytes_per_token"]}


def shard_tensors(
    input_ids: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    fmt: str,
    hidden: np.ndarray | None = None,
    target_logprob: np.ndarray | None = None,
    codec: str = "none",
    offset: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """One shard's tensors: ids [n, T], top-k [n, T, k] in `fmt` (or each row packed by `codec`), hidden
    [n, layers, T, H] in hidden_dtype(fmt), and (held-out) the teacher's log-prob of each next token
    [n, T - 1] in float32, and the sampled sparsifiers' KL offset [n, T] in float32."""
    tensors = {"input_ids": torch.from_numpy(np.ascontiguousarray(input_ids))}
    if codec == "none":
        tensors["indices"] = torch.from_numpy(np.ascontiguousarray(indices))
        tensors.update(encode_values(values.astype(np.float32), fmt))
    else:
        tensors.update(encode_rows(values.astype(np.float32), indices, codec, fmt))
    if hidden is not None:
        dtype = hidden_dtype(fmt)
        packed = _to_numpy(torch.from_numpy(np.ascontiguousarray(hidden)), dtype)
        if dtype == "float16" and not np.isfinite(packed).all():
            raise CacheError(
                "teacher hidden states overflow float16 (|x| > 65504); use cache.values_dtype=float32"
            )
        packed = torch.from_numpy(packed)
        tensors["hidden"] = packed.view(torch.bfloat16) if dtype == "bfloat16" else packed
    if offset is not None:
        tensors["offset"] = torch.from_numpy(np.ascontiguousarray(offset, np.float32))
    if target_logprob is not None:
        tensors["target_logprob"] = torch.from_numpy(target_logprob.astype(np.float32))
    return tensors


def heldout_rows(stream, ids: np.ndarray, k: int, vocab: int) -> tuple[np.ndarray, ...]:
    """Top-k and the log-prob of each next token for held-out rows, from full log-probs, a row at a time
    (a window of positions of a row whose [T, V] log-probs exceed evaluation's chunk: `eval_chunks`)."""
    _, width = eval_chunks(1, ids.shape[1], vocab, torch.float32)
    values, indices, target = [], [], []
    for row in ids:
        parts = []
        for a in range(0, len(row), width):
            b = min(a + width, len(row))
            log_p = torch.from_numpy(np.array(stream.full_log_probs(row[None, :b], a)))  # writable copy
            v, i = torch.topk(log_p, k, dim=-1)
            n = min(b, len(row) - 1) - a  # the window's positions that have a next token
            next_ids = torch.from_numpy(row[a + 1 : a + 1 + n].astype(np.int64))[None, :, None]
            nxt = log_p[:, :n].gather(-1, next_ids).squeeze(-1)
            parts.append((v.numpy(), i.numpy().astype(index_dtype(vocab)), nxt.numpy()))
        for out, got in zip((values, indices, target), zip(*parts, strict=True), strict=True):
            out.append(np.concatenate(got, axis=1))
    return np.concatenate(values), np.concatenate(indices), np.concatenate(target)


def fill(
    writer: CacheWriter,
    stream,
    data: dict[str, np.ndarray],
    shard_sequences: int,
    batch_size: int,
    progress,
) -> None:
    """Write every shard the cache is missing; `progress.update(tokens)` after each."""
    m = writer.manifest
    todo = [
        s
        for s in shard_plan({k: len(v) for k, v in data.items()}, shard_sequences)
        if (s[0], s[1]) not in writer.written()
    ]
    seq_len, codec = m["seq_len"], m.get("codec", "none")
    for split, start, end in (s for s in todo if s[0] == "heldout"):
        ids = data[split][start:end]
        values, indices, target = heldout_rows(stream, ids, m["k"], m["vocab_size"])
        tensors = shard_tensors(ids, values, indices, m["values"], target_logprob=target, codec=codec)
        writer.write_shard(split, start, tensors)
        progress.update((end - start) * seq_len)

    train = [s for s in todo if s[0] == "train"]
    batches = [
        (s, np.arange(r, min(r + batch_size, s[2]))) for s in train for r in range(s[1], s[2], batch_size)
    ]
    parts: list = []
    for (shard, rows), out in stream.stream(batches, lambda b: data["train"][b[1]]):
        parts.append(out)
        if rows[-1] + 1 < shard[2]:
            continue
        _, start, end = shard
        hidden = None
        if parts[0].hidden is not None:  # [layers, b, T, H] per reply -> [rows, layers, T, H]
            hidden = np.concatenate([p.hidden for p in parts], axis=1).transpose(1, 0, 2, 3)
        tensors = shard_tensors(
            data["train"][start:end],
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.indices for p in parts]),
            m["values"],
            hidden=hidden,
            codec=codec,
            offset=np.concatenate([p.offset for p in parts]) if parts[0].offset is not None else None,
        )
        writer.write_shard("train", start, tensors)
        progress.update((end - start) * seq_len)
        parts = []
