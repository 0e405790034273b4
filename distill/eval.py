"""Held-out evaluation against the teacher's FULL distribution.

The training loss only sees the teacher's top-k (a biased-low estimate of the KL), so evaluation asks
the teacher for full-vocabulary log-probs and reports the exact KL(teacher‖student), top-1 agreement
and perplexity. Sums are all-reduced, so every rank evaluates its own shard of the held-out set.
With no teacher (`teacher.source=none`), `evaluate_student` reports the student's perplexity alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from distill.dist import host_sum, pack, reduce_sum, to_device
from distill.models import plain_lm_head
from distill.stream.client import TeacherRaisedError, TeacherStreamError


def eval_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the [B, T, V] log-probs evaluation computes with: float64 on the CPU (the reference
    results the tests check), float32 on an accelerator, where a float64 copy of the logits would cost
    twice their memory and run at a fraction of the speed; the per-batch sums are float64 either way."""
    return torch.float64 if device.type == "cpu" else torch.float32


# Held-out rows are evaluated in chunks that keep one side's vocabulary-wide log-probs within
# EVAL_CHUNK_BYTES, however large trainer.micro_batch_size is: several rows at a time when they fit, and a
# row whose own [T, V] log-probs do not fit a window of positions at a time.
EVAL_CHUNK_BYTES = 512 * 2**20


def eval_chunks(micro_batch: int, seq_len: int, vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """(rows, positions) of one evaluation chunk: up to `micro_batch` whole rows whose [rows, seq_len,
    vocab] log-probs in `dtype` fit EVAL_CHUNK_BYTES (the teacher's reply and the student's log-probs are
    each at most that size); when one row does not fit, one row a window of as many positions as fit
    (never fewer than one)."""
    per_position = vocab * torch.finfo(dtype).bits // 8
    per_row = seq_len * per_position
    if per_row <= EVAL_CHUNK_BYTES:
        return min(micro_batch, EVAL_CHUNK_BYTES // per_row), seq_len
    return 1, max(1, EVAL_CHUNK_BYTES // per_position)


@dataclass
class Window:
    """Positions [a, b) of a batch of held-out rows: one evaluation chunk."""

    batch: np.ndarray  # the rows [B, T], whole (the teacher is sent `batch[:, :b]`)
    ids: torch.Tensor  # the same rows on the model's device
    counted: torch.Tensor  # [B, b - a]: which of the window's positions count
    a: int
    b: int

    def label_nll(self, log_probs: torch.Tensor) -> torch.Tensor:
        """-log p(next token) at the window's counted positions that have a next token (the row's last
        position has none); `log_probs` [B, b - a, V]."""
        n = min(self.b, self.ids.shape[1] - 1) - self.a
        next_ids = self.ids[:, self.a + 1 : self.a + 1 + n].unsqueeze(-1)
        return -log_probs[:, :n].gather(-1, next_ids).squeeze(-1)[self.counted[:, :n]]


class _StudentLogProbs:
    """The student's log-probs of one batch, a window of positions at a time: the decoder runs once per
    batch, on first use (after the ranks agreed on the teacher's answer), and the LM head once per window,
    so no [B, T, V] tensor is made. A head that is not a plain linear map (`plain_lm_head`) gets the
    whole logits, computed once."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype):
        self.model, self.ids, self.dtype = model, ids, dtype
        self.final: torch.Tensor | None = None
        self.head: torch.nn.Module = torch.nn.Identity()

    def __call__(self, a: int, b: int) -> torch.Tensor:
        if self.final is None:
            if plain_lm_head(self.model):
                self.final = self.model.get_decoder()(input_ids=self.ids).last_hidden_state
                self.head = self.model.get_output_embeddings()
            else:
                self.final = self.model(input_ids=self.ids).logits
        return torch.log_softmax(self.head(self.final[:, a:b]).to(self.dtype), dim=-1)


def _agreed(teacher_log_probs, window: Window) -> np.ndarray:
    """The teacher's log-probs of the window (`teacher_log_probs(rows cut at b, a)`), or
    TeacherStreamError on EVERY rank if any rank got none: the ranks agree before the model's forward (a
    collective under ZeRO-3) so none waits for a rank that has left."""
    try:
        answer, error = teacher_log_probs(window.batch[:, : window.b], window.a), None
    except TeacherStreamError as e:
        answer, error = None, e
    raised = isinstance(error, TeacherRaisedError)
    lost, ranks_raised = host_sum([error is not None, raised])  # host-side flags: the gloo group, no GPU sync
    if ranks_raised and not raised:  # the teacher's own error on another rank decides how all stop
        raise TeacherRaisedError("the teacher raised an error on another rank's request (see below)")
    if lost:
        raise error or TeacherStreamError("another rank lost the teacher during evaluation")
    return answer


def _counted(mask: np.ndarray | None, start: int, ids: torch.Tensor) -> torch.Tensor:
    """The positions of the rows from `start` that count: `mask` rows from `start`, or all of them."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return to_device(torch.from_numpy(mask[start : start + len(ids)]), ids.device).bool()


@torch.no_grad()
def _summed_over_ranks(
    model, sequences: np.ndarray, micro_batch: int, mask, window_sums, n: int
) -> list[float]:
    """Σ of the `n` values of `window_sums(window, student_log_probs)` over this rank's evaluation chunks
    (`eval_chunks`: rows, and windows of positions of a long row), in float64, all-reduced over ranks (a
    rank with no sequences adds zeros), with the model in eval mode. `student_log_probs()` runs the
    forward when first called, so a teacher can be asked (and the ranks agree on its answer) before it.
    Every rank runs the same number of chunks (the held-out rows are dealt evenly), and the sums stay on the
    model's device and are reduced there (`sum_over_ranks`): one host sync for the whole evaluation."""
    device = next(model.parameters()).device
    dtype = eval_dtype(device)
    seq_len = sequences.shape[1]
    rows, width = eval_chunks(micro_batch, seq_len, model.config.vocab_size, dtype)
    was_training = model.training
    model.eval()
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    for start in range(0, len(sequences), rows):
        batch = sequences[start : start + rows]
        ids = to_device(torch.from_numpy(batch.astype(np.int64)), device)
        counted, student = _counted(mask, start, ids), _StudentLogProbs(model, ids, dtype)
        for a in range(0, seq_len, width):
            b = min(a + width, seq_len)
            window = Window(batch, ids, counted[:, a:b], a, b)
            sums += pack(window_sums(window, lambda s=student, a=a, b=b: s(a, b)), device)
    reduce_sum(sums)
    model.train(was_training)
    return sums.tolist()


def _against_teacher(sums: list[float], kl_name: str) -> dict[str, float]:
    kl, agree, positions, nll, teacher_nll, label_positions = sums
    return {
        kl_name: kl / positions,
        "top1_agreement": agree / positions,
        "ppl": math.exp(nll / label_positions),
        "teacher_ppl": math.exp(teacher_nll / label_positions),
    }


def evaluate(
    model: torch.nn.Module,
    sequences: np.ndarray,
    teacher_log_probs,
    micro_batch: int,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of `model` on this rank's `sequences` [N, T]; collective (every rank must call it).

    `teacher_log_probs(input_ids [B, b], a) -> np.ndarray [B, b - a, V]` returns the full-vocabulary
    teacher log-probs of positions a..b-1 (`TeacherStream.full_log_probs`); a long row is asked for a
    window at a time (`eval_chunks`), its ids cut at the window's end (a causal model needs no more).
    `mask` [N, T] (positions that count, e.g. those predicting completion tokens; None = all).
    """

    def window_sums(w: Window, student_log_probs) -> list:
        answer = torch.from_numpy(np.asarray(_agreed(teacher_log_probs, w)))
        log_p = to_device(answer, w.ids.device).to(eval_dtype(w.ids.device))
        log_q = student_log_probs()
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)[w.counted]
        nll = w.label_nll(log_q)
        agree = (log_p.argmax(-1) == log_q.argmax(-1))[w.counted]
        return [kl.sum(), agree.sum(), kl.numel(), nll.sum(), w.label_nll(log_p).sum(), nll.numel()]

    return _against_teacher(_summed_over_ranks(model, sequences, micro_batch, mask, window_sums, 6), "kl")


def evaluate_student(
    model: torch.nn.Module, sequences: np.ndarray, micro_batch: int, mask: np.ndarray | None = None
) -> dict[str, float]:
    """With no teacher (`teacher.source=none`): the student's perplexity on the next tokens of the counted
    positions (`mask`, e.g. completion tokens; None = all). Collective, like `evaluate`."""

    def window_sums(w: Window, student_log_probs) -> list:
        nll = w.label_nll(student_log_probs())
        return [nll.sum(), nll.numel()]

    nll, label_positions = _summed_over_ranks(model, sequences, micro_batch, mask, window_sums, 2)
    return {"ppl": math.exp(nll / label_positions)}


def evaluate_cached(
    model: torch.nn.Module,
    sequences: np.ndarray,
    teacher_topk,
    micro_batch: int,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """With a teacher cache (`teacher=cached`) there is no full teacher distribution, so the exact KL
    cannot be computed; this reports what the cache supports honestly. Collective, like `evaluate`.

    `teacher_topk(input_ids) -> (log-probs [B, T, k], ids [B, T, k], log-prob of each next token
    [B, T - 1])`. kl_topk_bucket: KL over the k teacher ids plus one bucket holding the rest of the mass
    on each side, a lower bound of the exact KL (merging outcomes never increases a KL).
    """

    rows: list[torch.Tensor] = []  # the cache's top-k of the current batch's whole rows

    def window_sums(w: Window, student_log_probs) -> list:
        if w.a == 0:  # a new batch: its rows' top-k [B, T, k] are small, read once for all its windows
            rows[:] = [
                to_device(torch.from_numpy(np.asarray(x)), w.ids.device) for x in teacher_topk(w.batch)
            ]
        values, indices, target = (x[:, w.a : w.b] for x in rows)  # target [B, T - 1]: next tokens only
        dtype = eval_dtype(w.ids.device)
        log_p, log_q = values.to(dtype), student_log_probs()
        log_q_k = log_q.gather(-1, indices.long())
        p_tail = (1 - log_p.exp().sum(-1)).clamp_min(0)
        q_tail = (1 - log_q_k.exp().sum(-1)).clamp_min(torch.finfo(dtype).tiny)
        smallest = 1e-300 if dtype == torch.float64 else torch.finfo(dtype).tiny
        tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(smallest).log() - q_tail.log()), 0.0)
        kl = ((log_p.exp() * (log_p - log_q_k)).sum(-1) + tail)[w.counted]
        nll = w.label_nll(log_q)
        teacher_nll = -target.double()[w.counted[:, : target.shape[1]]]
        agree = (indices[..., 0].long() == log_q.argmax(-1))[w.counted]
        return [kl.sum(), agree.sum(), kl.numel(), nll.sum(), teacher_nll.sum(), nll.numel()]

    return _against_teacher(
        _summed_over_ranks(model, sequences, micro_batch, mask, window_sums, 6), "kl_topk_bucket"
    )
