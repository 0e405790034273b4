"""How cached top-k log-probs are stored: float16 / bfloat16 / float32 as the live stream sends them, or
8-bit codes; or, with `cache.codec`, each row packed by the stream's codecs (distill/codecs.py).

int8: a row's k log-probs are sorted descending, so they span [v_k, v_1]; each is stored as one byte on
a uniform grid over that row's own span (the row's top value and step in float32). Top-1 and the k-th
value are exact (to float32 rounding) and the order is kept; on SmolLM2 top-64 rows (span ~6.5 nats
median) the mean absolute error is ~0.007 nats (benchmarks/cache_storage.py). A fixed grid over [-30, 0]
would step 0.12.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.codecs import Packed, decode, decoded_dtype, encode
from distill.teacher.actor import _from_numpy, _to_numpy

VALUE_FORMATS = ("float16", "bfloat16", "float32", "int8")
_LEVELS = 255


def encode_values(values: np.ndarray, fmt: str) -> dict[str, torch.Tensor]:
    """Shard tensors for fp32 top-k log-probs [..., k] sorted descending (as torch.topk returns them).

    The float formats round exactly as the teacher actor does, so a cached reply equals a live one bit
    for bit at the same dtype.
    """
    if fmt == "int8":
        top, bottom = values[..., 0], values[..., -1]
        step = (top - bottom) / _LEVELS
        safe = np.where(step > 0, step, 1.0)[..., None]
        codes = np.clip(np.rint((top[..., None] - values) / safe), 0, _LEVELS).astype(np.uint8)
        return {
            "codes": torch.from_numpy(codes),
            "top": torch.from_numpy(top.astype(np.float32)),
            "step": torch.from_numpy(step.astype(np.float32)),
        }
    packed = torch.from_numpy(_to_numpy(torch.from_numpy(values), fmt))
    return {"values": packed.view(torch.bfloat16) if fmt == "bfloat16" else packed}


def decode_values(tensors: dict[str, torch.Tensor], fmt: str) -> tuple[np.ndarray, str]:
    """(values, values_dtype) in `TeacherOutput`'s scheme: int8 decodes to float32; bfloat16 stays as bits."""
    if fmt == "int8":
        codes = tensors["codes"].numpy().astype(np.float32)
        top, step = tensors["top"].numpy(), tensors["step"].numpy()
        return top[..., None] - codes * step[..., None], "float32"
    values = tensors["values"]
    return (values.view(torch.uint16) if fmt == "bfloat16" else values).numpy(), fmt


def value_keys(fmt: str) -> tuple[str, ...]:
    """The shard tensors that hold the values in format `fmt`."""
    return ("codes", "top", "step") if fmt == "int8" else ("values",)


def decode_float32(tensors: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """The values as float32, whatever the format (for evaluation)."""
    if fmt == "int8":
        return torch.from_numpy(decode_values(tensors, fmt)[0])
    return tensors["values"].float()


def encode_rows(values: np.ndarray, indices: np.ndarray, codec: str, fmt: str) -> dict[str, torch.Tensor]:
    """Shard tensors for rows [n, T, k] packed one row at a time by `codec`: the bytes of every row
    ("packed") and where each starts ("packed_offsets", n + 1 entries), so a row reads on its own."""
    blobs = [encode(v[None], i[None], codec, fmt).data for v, i in zip(values, indices)]
    offsets = np.cumsum([0, *map(len, blobs)], dtype=np.int64)
    return {
        "packed": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8),
        "packed_offsets": torch.from_numpy(offsets),
    }


def decode_row(data: bytes, shape: tuple[int, ...], codec: str, fmt: str, index_dtype: str):
    """(values in `TeacherOutput`'s scheme [1, T, k], ids [1, T, k], values dtype) of one packed row."""
    values, ids = decode(Packed(codec, shape, decoded_dtype(codec, fmt), index_dtype, data))
    return values, ids, decoded_dtype(codec, fmt)


def as_float32(values: np.ndarray, values_dtype: str) -> np.ndarray:
    """Values in `TeacherOutput`'s scheme as float32."""
    return _from_numpy(values, values_dtype).float().numpy()
