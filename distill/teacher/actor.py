"""The teacher actor: one replica of a causal LM behind a Ray actor.

Each request carries an id and a micro-batch of token ids; the reply carries the same id and the
teacher's top-k log-probs (normalised over the FULL vocabulary) as compact numpy arrays, which Ray
hands to the student through its shared-memory object store without a copy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

_NUMPY_VALUES = {"float16": np.float16, "float32": np.float32}


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


@dataclass
class TeacherOutput:
    """Top-k teacher log-probs for one micro-batch: values [B, T, k], indices [B, T, k]."""

    request_id: int
    values: np.ndarray  # float16 / float32, or uint16 holding bfloat16 bits (numpy has no bfloat16)
    indices: np.ndarray
    values_dtype: str
    compute_s: float

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.from_numpy(self.values.copy())  # Ray hands out read-only views; copy the small payload
        if self.values_dtype == "bfloat16":
            values = values.view(torch.bfloat16)
        indices = torch.from_numpy(self.indices.astype(np.int64))
        return values, indices

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes


class TeacherActor:
    """Hosts one teacher replica; wrapped with `ray.remote` by `TeacherPool`."""

    def __init__(
        self, model_dir: str, dtype: str = "auto", attn_implementation: str = "auto", threads: int = 1
    ):
        import transformers

        from distill.models import load_causal_lm

        transformers.utils.logging.disable_progress_bar()
        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(
            model_dir, dtype=dtype, attn_implementation=attn_implementation, device=self.device
        )
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size
        self.model_dir = model_dir

    def info(self) -> dict:
        return {
            "model_dir": self.model_dir,
            "vocab_size": self.vocab_size,
            "pid": os.getpid(),
            "dtype": str(next(self.model.parameters()).dtype),
            "device": str(self.device),
        }

    @torch.no_grad()
    def _log_probs(self, input_ids: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(input_ids.astype(np.int64)).to(self.device)
        logits = self.model(input_ids=ids).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def topk(
        self, request_id: int, input_ids: np.ndarray, k: int, values_dtype: str = "float16"
    ) -> TeacherOutput:
        """Top-k log-probs of every position of a micro-batch [B, T] of token ids."""
        start = time.perf_counter()
        values, indices = torch.topk(self._log_probs(input_ids), k, dim=-1)
        if values_dtype == "bfloat16":
            values_np = values.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
        else:
            values_np = values.cpu().numpy().astype(_NUMPY_VALUES[values_dtype])
        indices_np = indices.cpu().numpy().astype(index_dtype(self.vocab_size))
        return TeacherOutput(request_id, values_np, indices_np, values_dtype, time.perf_counter() - start)

    def full_log_probs(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-vocabulary fp32 log-probs [B, T, V], so evaluation measures the exact KL."""
        return self._log_probs(input_ids).cpu().numpy()
