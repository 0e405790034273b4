"""Tokenise documents and pack them into fixed-length sequences (no padding, EOS between documents)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.data.corpus import DataError


@dataclass
class PackedDataset:
    """Token ids [num_sequences, seq_len]; saved as .npy (no pickle) so every rank reads the same array."""

    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, self.tokens, allow_pickle=False)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PackedDataset:
        return cls(np.load(path, allow_pickle=False))


def pack_documents(docs: list[str], tokenizer, seq_len: int, what: str = "corpus") -> PackedDataset:
    """Concatenate tokenised documents separated by EOS and cut into full `seq_len` windows.

    The trailing partial window is dropped; a corpus shorter than one window is an error.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the student tokenizer has no eos_token; set one so documents can be separated.")
    ids: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(
            f"the {what} has {len(ids)} tokens, fewer than one sequence of data.seq_len={seq_len}; "
            f"add text or lower data.seq_len."
        )
    dtype = np.int32 if len(tokenizer) > np.iinfo(np.uint16).max else np.uint16
    return PackedDataset(np.asarray(ids[: n * seq_len], dtype=dtype).reshape(n, seq_len))
