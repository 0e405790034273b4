"""Encodings of a teacher's top-k reply (log-probs sorted descending, and their token ids), shared by the
live stream and the offline cache (`stream.codec`, `cache.codec`).

- `none`: the values in `values_dtype` and the ids as uint16 (int32 past 65,536 tokens) as they are:
  256 bytes/token at k=64 in float16.
- `zstd`: lossless. The same float16 / bfloat16 / float32 values and ids, bit for bit, order kept: each
  row's value bits delta-coded (a descending row of negative floats has ascending bit patterns, so the
  deltas are small), each id replaced by its rank in the reply's own table of ids (most frequent first:
  common tokens recur across positions, so ranks are small), all split into byte planes and compressed
  with zstd.
- `hybrid`, `hybrid_coarse`: lossy. Each log-prob becomes the integer code round(p / dp + log p / dl):
  a grid fine in probability where p is large and fine in log-probability where p is small, the two
  places the KD loss is sensitive to. The map is monotone, so a sorted row's codes are non-increasing:
  stored as the row's first code (delta to the previous row's) and non-negative deltas, in byte planes,
  with zstd; ids as for `zstd`. `hybrid` uses dp = 5e-5, dl = 0.05; `hybrid_coarse` dp = 1e-3,
  dl = 0.1. Decoding is one table lookup (the grid inverted once with Newton's method in float64).
  Log-probs below -100 nats are stored as -100 (p < 4e-44, zero in float32 either way), so the sampled
  sparsifiers' empty slots (-inf) come back as -100.

The scheme follows `../shared/notes/topk-fidelity.md`; measured on the real teacher by
`benchmarks/stream_codecs.py` (bytes/token, the KD loss's change against fp32, encode/decode speed).
A packed reply is one self-describing byte string (a small header, then the compressed segments), so
the stream sends it as is and the cache stores it per row.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

CODECS = ("none", "zstd", "hybrid", "hybrid_coarse")
GRIDS = {"hybrid": (5e-5, 0.05), "hybrid_coarse": (1e-3, 0.1)}  # (dp, dl)
LOGPROB_FLOOR = -100.0
ZSTD_LEVEL = 3
_FLOAT_BITS = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.uint32}
_HEADER = struct.Struct("<5I")  # rows, k, and the sizes of the first three segments (the fourth is the rest)


@dataclass
class Packed:
    """An encoded top-k block: `shape` is the values' shape [..., k]; `values_dtype` is the dtype the
    values decode to (numpy scheme of `TeacherOutput`: bfloat16 as uint16 bits; float32 for `hybrid`)."""

    codec: str
    shape: tuple[int, ...]
    values_dtype: str
    index_dtype: str
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def check_codec(codec: str, values_dtype: str) -> None:
    """Refuse unknown codecs, naming the choices."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if codec == "zstd" and values_dtype not in _FLOAT_BITS:
        raise ValueError(f"codec zstd compresses float16 / bfloat16 / float32 values, not {values_dtype!r}")


def float_bits(values: np.ndarray, values_dtype: str) -> np.ndarray:
    """fp32 log-probs rounded to `values_dtype` as `TeacherOutput` holds them (bfloat16 as uint16 bits)."""
    if values_dtype == "bfloat16":
        return (
            torch.from_numpy(np.ascontiguousarray(values, np.float32)).bfloat16().view(torch.uint16).numpy()
        )
    return np.asarray(values).astype(values_dtype)


def decoded_dtype(codec: str, values_dtype: str) -> str:
    """The dtype `codec`'s values decode to: `values_dtype` itself, or float32 for the hybrid grids."""
    return "float32" if codec in GRIDS else values_dtype


def encode(values: np.ndarray, indices: np.ndarray, codec: str, values_dtype: str = "float16") -> Packed:
    """Pack fp32 top-k log-probs [..., k] (sorted descending, as `torch.topk` gives them) and their ids.
    For `zstd` the values are first rounded to `values_dtype` exactly as codec `none` would send them."""
    check_codec(codec, values_dtype)
    if codec == "none":
        raise ValueError("codec none sends the arrays as they are; there is nothing to pack")
    shape, k = tuple(values.shape), values.shape[-1]
    ids = np.ascontiguousarray(indices).reshape(-1, k)
    if codec == "zstd":
        bits = float_bits(values, values_dtype).view(_FLOAT_BITS[values_dtype]).reshape(-1, k)
        first, rest = bits[:, :1], np.diff(bits, axis=1)  # unsigned: wraps, and the cumsum unwraps it
    else:
        codes = _codes(np.asarray(values, np.float64).reshape(-1, k), *GRIDS[codec])
        first = codes[:, :1].astype(np.int32)
        first = np.concatenate([first[:1], np.diff(first, axis=0)])  # neighbouring rows' top values agree
        rest = (codes[:, :-1] - codes[:, 1:]).astype(np.uint16)  # >= 0 for a sorted row; wraps otherwise
    table, ranks = _frequency_ranks(ids)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    blobs = [compressor.compress(_planes(a)) for a in (first, rest, table, ranks)]
    header = _HEADER.pack(ids.shape[0], k, *(len(b) for b in blobs[:3]))
    data = header + b"".join(blobs)
    return Packed(codec, shape, decoded_dtype(codec, values_dtype), str(ids.dtype), data)


def decode(packed: Packed) -> tuple[np.ndarray, np.ndarray]:
    """(values in `packed.values_dtype`'s numpy scheme, ids) with the shapes they were encoded with."""
    rows, k, *sizes = _HEADER.unpack_from(packed.data)
    ends = np.cumsum([_HEADER.size, *sizes]).tolist()
    data, decompressor = packed.data, zstandard.ZstdDecompressor()
    first, rest, table, ranks = (
        decompressor.decompress(data[a:b]) for a, b in zip(ends, [*ends[1:], len(data)])
    )
    table = _unplanes(table, packed.index_dtype, (-1,))
    ids = table[_unplanes(ranks, packed.index_dtype, (rows, k))]
    if packed.codec == "zstd":
        bits_dtype = _FLOAT_BITS[packed.values_dtype]
        bits = np.concatenate(
            [_unplanes(first, bits_dtype, (rows, 1)), _unplanes(rest, bits_dtype, (rows, k - 1))], axis=1
        )
        values = np.cumsum(bits, axis=1, dtype=bits_dtype)
        if packed.values_dtype != "bfloat16":
            values = values.view(packed.values_dtype)
    else:
        dp, dl = GRIDS[packed.codec]
        low, table = _inverse_table(dp, dl)
        top = np.cumsum(_unplanes(first, np.int32, (rows, 1)), axis=0, dtype=np.int64)
        steps = np.cumsum(_unplanes(rest, np.uint16, (rows, k - 1)), axis=1, dtype=np.int64)
        codes = np.concatenate([top, top - steps], axis=1)
        offsets = (codes - low) % 65536  # the span of codes is < 65,536: a wrapped delta comes back exactly
        values = table[offsets]
    return values.reshape(packed.shape), ids.reshape(packed.shape)


def _codes(log_p: np.ndarray, dp: float, dl: float) -> np.ndarray:
    log_p = np.clip(log_p, LOGPROB_FLOOR, 0.0)
    return np.rint(np.exp(log_p) / dp + log_p / dl).astype(np.int64)


@functools.cache
def _inverse_table(dp: float, dl: float) -> tuple[int, np.ndarray]:
    """(lowest code, log-prob of each code from it on, float32): the inverse of c = e^x / dp + x / dl
    on [LOGPROB_FLOOR, 0]. The map is increasing and convex, so Newton's method from above converges."""
    low = int(_codes(np.array([LOGPROB_FLOOR]), dp, dl)[0])
    high = int(_codes(np.array([0.0]), dp, dl)[0])
    if high - low >= 65536:
        raise ValueError(f"the grid dp={dp}, dl={dl} has more than 65,536 codes")
    code = np.arange(low, high + 1, dtype=np.float64)
    x = np.minimum(code * dl, 0.0)  # at or above the root: c*dl solves x/dl = c, and e^x/dp > 0
    for _ in range(100):
        step = (np.exp(x) / dp + x / dl - code) / (np.exp(x) / dp + 1 / dl)
        x -= step
        if np.abs(step).max() < 1e-12:
            break
    table = np.clip(x, LOGPROB_FLOOR, 0.0).astype(np.float32)
    return low, np.concatenate([table, np.zeros(65536 - table.size, np.float32)])


def _frequency_ranks(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids, most frequent first; each id's rank in that table). Ranks are skewed to small
    numbers where the ids themselves are not: 11.5 bytes/token fewer than compressing the ids directly
    at k=64 and 1,024 tokens per block on SmolLM2 (benchmarks/stream_codecs.py)."""
    counts = np.bincount(ids.ravel())
    distinct = np.flatnonzero(counts)
    table = distinct[np.argsort(-counts[distinct], kind="stable")].astype(ids.dtype)
    rank_of = np.empty(counts.size, ids.dtype)
    rank_of[table] = np.arange(table.size)
    return table, rank_of[ids]


def _planes(a: np.ndarray) -> bytes:
    """Bytes grouped by significance (all low bytes, then the next...): small numbers leave runs of zeros."""
    a = np.ascontiguousarray(a)
    return np.ascontiguousarray(a.view(np.uint8).reshape(a.size, a.itemsize).T).tobytes()


def _unplanes(data: bytes, dtype, shape: tuple[int, ...]) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    planes = np.frombuffer(data, np.uint8).reshape(itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)
