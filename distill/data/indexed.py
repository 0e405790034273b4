"""Megatron's indexed dataset format (`<prefix>.bin` + `<prefix>.idx`), written and memory-mapped here.

`.bin` holds every document's token ids back to back; `.idx` holds a header (magic, version 1, dtype
code, sequence and document counts) then int32 sequence lengths, int64 byte offsets and int64 document
indices. It is the format Megatron-LM's `preprocess_data.py`, NeMo and ModelOpt distillation read and
write, so a corpus tokenised here trains there and the other way round (tests check both directions
against megatron-core). The ~80 lines below replace a dependency on megatron-core, whose package import
(its optimizer and parallel-state modules come with it) costs seconds in every worker and rank.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_DTYPE_CODE = {np.dtype(t): c for c, t in _CODES.items()}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest id type Megatron uses for a vocabulary: uint16 below 65,500 tokens, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class ShardWriter:
    """Appends documents to `<prefix>.bin` as they come; `finish` writes `<prefix>.idx`. Memory held: one
    int32 length per document. Both files go to temporary names first and are renamed by `finish`, so a
    prefix that exists is always complete."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self.lengths: list[int] = []
        self._bin = open(self._tmp(".bin"), "wb")

    def _tmp(self, suffix: str) -> Path:
        return self.prefix.with_name(f".{self.prefix.name}{suffix}.{os.getpid()}.tmp")

    def add(self, ids) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        self._bin.write(array.tobytes())
        self.lengths.append(array.size)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._tmp(".idx"), "wb") as f:
            f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
            f.write(lengths.tobytes() + pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())  # one sequence per document
            f.flush()
            os.fsync(f.fileno())
        self._tmp(".bin").replace(self.prefix.with_suffix(".bin"))
        self._tmp(".idx").replace(self.prefix.with_suffix(".idx"))

    def abort(self) -> None:
        self._bin.close()
        self._tmp(".bin").unlink(missing_ok=True)


class IndexedShard:
    """One `.bin`/`.idx` pair, memory-mapped: the header is read at once, the token stream on access."""

    def __init__(self, prefix: Path | str):
        self.prefix = Path(prefix)
        idx = self.prefix.with_suffix(".idx")
        with open(idx, "rb") as f:
            header = f.read(_HEADER)
        if len(header) < _HEADER or header[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{idx} is not a Megatron indexed-dataset index (bad header); re-tokenise it.")
        version, code = struct.unpack("<QB", header[len(MAGIC) : len(MAGIC) + 9])
        if version != 1 or code not in _CODES:
            raise ValueError(f"{idx}: unsupported index version {version} or dtype code {code}.")
        self.dtype = np.dtype(_CODES[code])
        self.sequences, self.documents = struct.unpack("<QQ", header[len(MAGIC) + 9 :])
        size = self.prefix.with_suffix(".bin").stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"{self.prefix}.bin: {size} bytes is not a whole number of {self.dtype} ids.")
        self.num_tokens = size // self.dtype.itemsize
        self._tokens: np.ndarray | None = None

    def lengths(self) -> np.ndarray:
        """Every sequence's length, memory-mapped from the index."""
        return np.memmap(self.prefix.with_suffix(".idx"), np.int32, "r", _HEADER, (self.sequences,))

    def pointers(self) -> np.ndarray:
        """Every sequence's byte offset in `.bin`, memory-mapped from the index."""
        offset = _HEADER + 4 * self.sequences
        return np.memmap(self.prefix.with_suffix(".idx"), np.int64, "r", offset, (self.sequences,))

    def document_indices(self) -> np.ndarray:
        """Megatron's document index: document d is sequences [doc[d], doc[d + 1]) (its first entry 0, its
        last the sequence count: `documents` - 1 documents), memory-mapped from the index."""
        offset = _HEADER + 12 * self.sequences
        return np.memmap(self.prefix.with_suffix(".idx"), np.int64, "r", offset, (self.documents,))

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream as a read-only memory map (no bytes are read until indexed)."""
        if self._tokens is None:
            if self.num_tokens == 0:
                return np.zeros(0, self.dtype)
            with open(self.prefix.with_suffix(".bin"), "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # random access (a Megatron import's documents, `IndexedShard.tokens` users): no read-ahead
            # around each fault (training reads its windows with preadv instead: distill/data/shards.py)
            mapped.madvise(mmap.MADV_RANDOM)
            self._tokens = np.frombuffer(mapped, self.dtype)
        return self._tokens

    def close(self) -> None:
        self._tokens = None
