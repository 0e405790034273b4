"""Read a teacher-signal cache during training: the same interface as the live TeacherStream.

`CachedTeacher.stream(batches, input_ids_of)` yields (batch, TeacherOutput) for micro-batches `(step,
rows)` of the run's training windows, so the training loop and the loss code are the ones online training
uses. Each shard's size is checked when it is opened and each row's cached input ids must equal the batch's
ids; `verify(rank, world)` hashes every world-th shard, so the ranks together check each shard once at
start. Held-out signals for evaluation are looked up by the sequence's tokens (`heldout`).
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from distill.cache.codec import as_float32, decode_float32, decode_row, decode_values, value_keys
from distill.cache.manifest import CacheError, read_manifest
from distill.files import sha256_file
from distill.stream import StreamStats
from distill.teacher.actor import TeacherOutput

MAX_OPEN = 64  # shard files kept open per process


def teacher_folder(cache_path: str | None, name_or_path: str | None = None) -> Path:
    """The teacher's config and tokenizer saved in the cache (`teacher=cached` uses it as the teacher
    folder: vocabulary and layer checks read it; it has no weights). `name_or_path` (the model the cache
    was written from) is not used here: it is there for students cut from the teacher."""
    if not cache_path:
        raise CacheError(
            "teacher=cached needs cache.path=/path/to/cache (written by `python -m launch.cache`)."
        )
    folder = Path(cache_path).expanduser() / "teacher"
    if not folder.is_dir():
        read_manifest(Path(cache_path).expanduser())  # the clearer error when it is no cache at all
        raise CacheError(f"{folder} is missing: the cache is incomplete; rerun `python -m launch.cache`.")
    return folder


class CachedTeacher:
    """Teacher signals from a cache: top-`topk` log-probs (and hidden states of `hidden_layers`)."""

    def __init__(self, cache_dir: str | Path, topk: int, hidden_layers: list[int] | None = None):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        if not self.manifest["complete"]:
            raise CacheError(f"the cache {self.dir} is incomplete; finish it by rerunning `launch.cache`.")
        if topk > self.manifest["k"]:
            raise CacheError(f"stream.topk={topk} exceeds the cache's k={self.manifest['k']} ({self.dir}).")
        self.topk, self.fmt = topk, self.manifest["values"]
        self.codec = self.manifest.get("codec", "none")
        self.sampled = self.manifest.get("sparsifier", {"kind": "topk"})["kind"] != "topk"
        self.width = None if self.sampled else topk  # sampled rows are used whole (check_run: same scheme)
        stored = (self.manifest["hidden"] or {}).get("layers", [])
        self.hidden_layers = list(hidden_layers) if hidden_layers else None
        missing = set(self.hidden_layers or ()) - set(stored)
        if missing:
            raise CacheError(
                f"the cache {self.dir} stores no hidden states of teacher layers {sorted(missing)}."
            )
        self._hidden_pos = [stored.index(j) for j in self.hidden_layers or ()]
        self._shards = {
            split: sorted(
                (s for s in self.manifest["shards"] if s["split"] == split), key=lambda s: s["start"]
            )
            for split in ("train", "heldout")
        }
        self._starts = {split: [s["start"] for s in shards] for split, shards in self._shards.items()}
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._heldout: dict[bytes, tuple] | None = None
        self.stats = StreamStats()

    def _handle(self, shard: dict):
        """The open shard (at most MAX_OPEN stay open, least recently used closed first), its size checked
        against the manifest on opening; contents are checked by `verify`."""
        name = shard["file"]
        handle = self._open.pop(name, None)
        if handle is None:
            path = self.dir / name
            if not path.is_file():
                raise CacheError(f"cache shard {path} is missing; rewrite the cache.")
            if path.stat().st_size != shard["bytes"]:
                raise CacheError(
                    f"cache shard {path} has {path.stat().st_size} bytes, the manifest {shard['bytes']}: the "
                    f"file is damaged; refusing to use it. Rewrite the cache (`python -m launch.cache`)."
                )
            handle = safe_open(str(path), framework="pt")
        self._open[name] = handle
        while len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)
        return handle

    def verify(self, rank: int = 0, world: int = 1) -> list[str]:
        """sha256 of this rank's share of the shards (every `world`-th, from `rank`); returns the damaged
        ones. With every rank calling it, each shard is hashed once per run, not once per rank."""
        shards = sorted(self.manifest["shards"], key=lambda s: s["file"])[rank::world]
        return [s["file"] for s in shards if sha256_file(self.dir / s["file"]) != s["sha256"]]

    def _locate(self, split: str, row: int) -> tuple[Any, int]:
        """(the open shard holding `row` of `split`, the row's index in it)."""
        shards = self._shards[split]
        i = bisect.bisect_right(self._starts[split], row) - 1
        if i < 0 or row >= shards[i]["start"] + shards[i]["rows"]:
            raise CacheError(f"row {row} of the {split} split is not in the cache {self.dir}.")
        return self._handle(shards[i]), row - shards[i]["start"]

    def _row(self, split: str, row: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        handle, local = self._locate(split, row)
        return {key: handle.get_slice(key)[local : local + 1] for key in keys}

    def _rows(self, split: str, rows: Iterable[int], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        got = [self._row(split, int(r), keys) for r in rows]
        return {key: torch.cat([g[key] for g in got]) for key in keys}

    def _topk_keys(self) -> tuple[str, ...]:
        return ("indices", *value_keys(self.fmt)) if self.codec == "none" else ()

    def _topk(self, split: str, rows: Iterable[int], got: dict[str, torch.Tensor]) -> tuple:
        """(values in `TeacherOutput`'s scheme, ids, values dtype) of `rows`: from the tensors `got` read
        with `_topk_keys()`, or each row's packed bytes decoded (cache.codec)."""
        if self.codec == "none":
            values, values_dtype = decode_values(got, self.fmt)
            return values, got["indices"].numpy(), values_dtype
        shape = (1, self.manifest["seq_len"], self.manifest["k"])
        parts = []
        for row in rows:
            handle, local = self._locate(split, int(row))
            start, end = handle.get_slice("packed_offsets")[local : local + 2].tolist()
            data = handle.get_slice("packed")[start:end].numpy().tobytes()
            parts.append(decode_row(data, shape, self.codec, self.fmt, self.manifest["index_dtype"]))
        values, ids, dtypes = zip(*parts)
        return np.concatenate(values), np.concatenate(ids), dtypes[0]

    def stream(self, batches: Iterable[Any], input_ids_of) -> Iterator[tuple[Any, TeacherOutput]]:
        """Yield (batch, teacher output) for micro-batches `(step, rows)`; same contract as TeacherStream."""
        keys = ("input_ids", *self._topk_keys(), *(("hidden",) if self.hidden_layers else ()))
        keys += ("offset",) if self.sampled else ()
        for n, batch in enumerate(batches):
            start = time.perf_counter()
            got = self._rows("train", batch[1], keys)
            ids = np.asarray(input_ids_of(batch))
            if not np.array_equal(got["input_ids"].numpy(), ids):
                raise CacheError(
                    f"the cached input ids of train rows {list(batch[1])} differ from the run's: the cache "
                    f"was built over other data; write a cache for this run's data."
                )
            values, indices, values_dtype = self._topk("train", batch[1], got)
            hidden = None
            if self.hidden_layers:  # [rows, stored layers, T, H] -> [requested layers, rows, T, H]
                hidden = _numpy(got["hidden"])[:, self._hidden_pos].transpose(1, 0, 2, 3)
            out = TeacherOutput(
                n,
                np.ascontiguousarray(values[..., : self.width]),
                np.ascontiguousarray(indices[..., : self.width]),
                values_dtype,
                0.0,
                hidden=hidden,
                hidden_layers=self.hidden_layers,
                offset=got["offset"].numpy() if self.sampled else None,
            )
            self.stats.wait_s += time.perf_counter() - start
            self.stats.bytes += out.nbytes
            self.stats.tokens += ids.size
            self.stats.requests += 1
            yield batch, out

    def heldout(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top-k log-probs float32 [B, T, k], ids int64 [B, T, k], log-prob of each next token [B, T-1]) for
        held-out sequences, found by their tokens."""
        if self._heldout is None:
            keys = ("input_ids", "target_logprob", *self._topk_keys())
            self._heldout = {}
            for shard in self._shards["heldout"]:
                rows = range(shard["start"], shard["start"] + shard["rows"])
                got = self._rows("heldout", rows, keys)
                if self.codec == "none":
                    values, indices = decode_float32(got, self.fmt).numpy(), got["indices"].numpy()
                else:
                    values, indices, values_dtype = self._topk("heldout", rows, got)
                    values = as_float32(values, values_dtype)
                rows = zip(got["input_ids"], values, indices, got["target_logprob"])
                for ids, v, i, target in rows:
                    self._heldout[ids.numpy().tobytes()] = (v, i, target.numpy())
        found = []
        for row in np.asarray(input_ids):
            if row.tobytes() not in self._heldout:
                raise CacheError(
                    f"a held-out sequence of the run is not in the cache {self.dir}; rewrite it."
                )
            found.append(self._heldout[row.tobytes()])
        values, indices, target = (np.stack(x) for x in zip(*found))
        return values[..., : self.topk], indices[..., : self.topk].astype(np.int64), target


def _numpy(x: torch.Tensor) -> np.ndarray:
    """numpy view in TeacherOutput's scheme (bfloat16 as its uint16 bits)."""
    return (x.view(torch.uint16) if x.dtype == torch.bfloat16 else x).numpy()
