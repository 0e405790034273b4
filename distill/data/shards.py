"""Training windows read straight from tokenised shards: no process holds the dataset in memory.

A tokenised dataset (`manifest.json` + Megatron `.bin`/`.idx` shards, distill/data/tokenize.py) is cut at
read time into windows of `seq_len` tokens: window w of a shard is its tokens [w * seq_len, (w + 1) *
seq_len) (documents run on across windows, EOS-separated, as packing always did; each shard's last partial
window is left out). A run's training data is one or more such datasets (named sources) laid end to end;
`TrainWindows[idx]` reads just those windows (one `preadv` each), keeping at most `MAX_OPEN` shard files
open. `check_dataset` is what `prepare` runs: the manifest, the tokenizer and every shard's size, from
file metadata only, in seconds for any corpus size.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from distill.data.corpus import DataError
from distill.data.indexed import IndexedShard
from distill.data.tokenize import FORMAT

MAX_OPEN = 64  # memory-mapped shard files kept open per process (least recently used are closed)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"{folder} has no manifest.json: it is not a finished tokenisation. Run (or rerun, it resumes) "
            f"`python -m launch.tokenize source=... out={folder}`."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; re-tokenise it.")
    return manifest


def manifest_digest(folder: Path) -> str:
    """The dataset's identity: sha256 of its manifest, which lists every shard's sha256."""
    return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()


def check_dataset(folder: Path, tokenizer_sha256: str | None = None, tokenizer_dir: str = "") -> dict:
    """The manifest of a finished tokenisation whose shards are all present with their recorded sizes and
    whose tokenizer is the run's. Reads metadata only (file sizes, not contents)."""
    manifest = read_manifest(folder)
    if tokenizer_sha256 is not None and manifest["tokenizer"]["sha256"] != tokenizer_sha256:
        raise DataError(
            f"{folder} was tokenised with another tokenizer than the student's ({tokenizer_dir}); "
            f"re-tokenise it with `python -m launch.tokenize tokenizer={tokenizer_dir} ...` or use the "
            f"student it was made for."
        )
    itemsize = np.dtype(manifest["tokenizer"]["dtype"]).itemsize
    for split, shards in manifest["shards"].items():
        for shard in shards:
            path = Path(folder) / f"{shard['name']}.bin"
            size = path.stat().st_size if path.is_file() else None
            if size != shard["tokens"] * itemsize or not path.with_suffix(".idx").is_file():
                raise DataError(
                    f"{path} is missing or has the wrong size ({size} bytes, manifest: "
                    f"{shard['tokens'] * itemsize}): the {split} shards of {folder} are damaged. Delete "
                    f"{Path(folder) / 'done' / Path(shard['name']).name}.json and manifest.json there and "
                    f"rerun the same `launch.tokenize` command: it redoes just that piece."
                )
    return manifest


class _OpenShards:
    """An LRU of open shard files: a dataset of 10,000 shards keeps at most `MAX_OPEN` files open."""

    def __init__(self, prefixes: list[Path]):
        self.prefixes = prefixes
        self._open: OrderedDict[int, tuple[int, np.dtype]] = OrderedDict()

    def file(self, i: int) -> tuple[int, np.dtype]:
        """Shard i's `.bin`, open (a file descriptor), and its token dtype."""
        entry = self._open.get(i)
        if entry is not None:
            self._open.move_to_end(i)
            return entry
        dtype = IndexedShard(self.prefixes[i]).dtype  # the header: the shard's dtype, and that it is one
        fd = os.open(self.prefixes[i].with_suffix(".bin"), os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            # windows are read at random offsets: no read-ahead, even where two happen to be consecutive
            # (a read at a random offset reads just its own pages anyway: 8 KB of page cache per 8 KB
            # window, measured; a memory map read around each fault, 100x that)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._open[i] = entry = (fd, dtype)
        while len(self._open) > MAX_OPEN:
            os.close(self._open.popitem(last=False)[1][0])
        return entry

    def __del__(self):
        for fd, _ in getattr(self, "_open", {}).values():
            os.close(fd)


class Windows:
    """The `seq_len` windows of a list of shards, indexed 0..len-1 in shard order (optionally capped)."""

    def __init__(self, prefixes: list[Path], tokens: list[int], seq_len: int, cap: int | None = None):
        self.seq_len = seq_len
        per_shard = np.asarray(tokens, dtype=np.int64) // seq_len
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])
        self._starts = self.starts.tolist()
        self.count = int(self.starts[-1]) if cap is None else min(int(self.starts[-1]), cap)
        self.shards = _OpenShards(prefixes)

    def __len__(self) -> int:
        return self.count

    def read(self, idx) -> np.ndarray:
        """Windows `idx` (any order, repeats allowed) as an array [len(idx), seq_len]. A rank reads a few
        windows per micro-batch: plain Python per row (bisect over the shard starts) beats numpy's fixed
        cost per call here, and each row is one `preadv` straight into the output (a memory map faulted
        the row in page by page, twice the time on a cold page cache; benchmarks/data.py loader)."""
        rows = np.asarray(idx, dtype=np.int64).tolist()
        if not rows:
            return np.zeros((0, self.seq_len), dtype=np.int32)
        starts, count, seq_len = self._starts, self.count, self.seq_len
        out = None
        for row, i in enumerate(rows):
            if not 0 <= i < count:
                raise IndexError(f"window index {i} out of range [0, {count})")
            s = bisect.bisect_right(starts, i) - 1
            fd, dtype = self.shards.file(s)
            if out is None:
                out = np.empty((len(rows), seq_len), dtype=dtype)
            same = dtype == out.dtype  # else a shard of another dtype than the first row's: converted
            into = out[row] if same else np.empty(seq_len, dtype)
            got = os.preadv(fd, [into], (i - starts[s]) * into.nbytes)
            if got != into.nbytes:
                raise DataError(
                    f"{self.shards.prefixes[s]}.bin: window {i - starts[s]} is past the file's end ({got} of "
                    f"{into.nbytes} bytes read): the shard is truncated; re-tokenise it."
                )
            if not same:
                out[row] = into
        return out


def dataset_windows(folder: Path, split: str, seq_len: int, cap: int | None = None) -> Windows:
    manifest = read_manifest(folder)
    shards = manifest["shards"][split]
    return Windows([Path(folder) / s["name"] for s in shards], [s["tokens"] for s in shards], seq_len, cap)


class TrainWindows:
    """A run's training windows: its sources' windows end to end, global index = source offset + local.

    Built from the run's `data/dataset.json` (written by `prepare`); every rank opens it and reads only the
    windows the sampler gives it."""

    def __init__(self, data_dir: Path):
        self.spec = json.loads((Path(data_dir) / "dataset.json").read_text())
        self.seq_len = self.spec["seq_len"]
        self.sources = []
        for src in self.spec["sources"]:
            windows = dataset_windows(Path(src["path"]), "train", self.seq_len, src.get("cap"))
            masks = None
            if src.get("mask_path"):
                masks = dataset_windows(Path(src["mask_path"]), "train", self.seq_len, src.get("cap"))
            self.sources.append((windows, masks))
        self.sizes = [len(w) for w, _ in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, idx: np.ndarray) -> np.ndarray:
        """Position in this run's trained sources of each window."""
        return (np.searchsorted(self.offsets, np.asarray(idx), side="right") - 1).astype(np.int64)

    def source_index(self, idx: np.ndarray) -> np.ndarray:
        """Index into `data.sources` of each window (what routing maps to a teacher)."""
        ids = np.asarray([s.get("source_index", i) for i, s in enumerate(self.spec["sources"])], np.int64)
        return ids[self.source_of(idx)]

    def _gather(self, idx: np.ndarray, masks: bool) -> np.ndarray | None:
        if len(self.sources) == 1:  # global indices are the source's own: no numpy calls to route them
            windows = self.sources[0][1] if masks else self.sources[0][0]
            return None if windows is None else windows.read(idx)
        idx = np.asarray(idx, dtype=np.int64)
        src = self.source_of(idx)
        parts = {}
        for s in np.unique(src):
            windows = self.sources[s][1] if masks else self.sources[s][0]
            if windows is None:
                return None
            parts[s] = windows.read(idx[src == s] - self.offsets[s])
        dtype = np.result_type(*[p.dtype for p in parts.values()]) if parts else np.int32
        out = np.empty((len(idx), self.seq_len), dtype=dtype)
        for s, part in parts.items():
            out[src == s] = part
        return out

    def __getitem__(self, idx) -> np.ndarray:
        """Token ids of windows `idx` (global indices or a slice), [len(idx), seq_len]."""
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        return self._gather(idx, masks=False)

    @property
    def digest(self) -> str:
        """The identity of the run's data (dataset.json's digest): what caches and resumes must match."""
        return self.spec["digest"]

    @property
    def weights(self) -> list[float] | None:
        weights = [s.get("weight") for s in self.spec["sources"]]
        return None if all(w is None for w in weights) else weights

    def target_mask(self, idx) -> np.ndarray | None:
        """Which tokens are targets (data.format=completions); None for plain text (all are)."""
        mask = self._gather(idx, masks=True)
        return None if mask is None else mask.astype(np.bool_)
