"""Held-out evaluation against the teacher's FULL distribution.

The training loss only sees the teacher's top-k (a biased-low estimate of the KL), so evaluation asks
the teacher for full-vocabulary log-probs and reports the exact KL(teacher‖student), top-1 agreement
and perplexity. Sums are all-reduced, so every rank evaluates its own shard of the held-out set.
With no teacher (`teacher.source=none`), `evaluate_student` reports the student's perplexity alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distill.dist import host_sum, pack, reduce_sum, to_device
from distill.stream.client import TeacherRaisedError, TeacherStreamError


def eval_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the [B, T, V] log-probs evaluation computes with: float64 on the CPU (the reference
    results the tests check), float32 on an accelerator, where a float64 copy of the logits would cost
    twice their memory and run at a fraction of the speed; the per-batch sums are float64 either way."""
    return torch.float64 if device.type == "cpu" else torch.float32


# Held-out rows are evaluated this many at a time at most: as many as keep one side's [rows, T, V]
# log-probs within EVAL_CHUNK_BYTES (at least one row), however large trainer.micro_batch_size is.
EVAL_CHUNK_BYTES = 512 * 2**20


def eval_rows(micro_batch: int, seq_len: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per evaluation batch: `micro_batch`, fewer when their [rows, seq_len, vocab] log-probs in
    `dtype` would exceed EVAL_CHUNK_BYTES (the teacher's reply and the student's log-probs are each that
    size), never below one row."""
    per_row = seq_len * vocab * torch.finfo(dtype).bits // 8
    return max(1, min(micro_batch, EVAL_CHUNK_BYTES // per_row))


def _agreed(teacher_log_probs, batch: np.ndarray) -> np.ndarray:
    """The teacher's answer, or TeacherStreamError on EVERY rank if any rank got none: the ranks agree
    before the model's forward (a collective under ZeRO-3) so none waits for a rank that has left."""
    try:
        answer, error = teacher_log_probs(batch), None
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
    """The positions of this micro-batch that count: `mask` rows from `start`, or all of them."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return to_device(torch.from_numpy(mask[start : start + len(ids)]), ids.device).bool()


def _label_nll(log_probs: torch.Tensor, ids: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """-log p(next token) at the counted positions that have a next token."""
    return -log_probs[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[counted[:, :-1]]


@torch.no_grad()
def _summed_over_ranks(
    model, sequences: np.ndarray, micro_batch: int, mask, batch_sums, n: int
) -> list[float]:
    """Σ of the `n` values of `batch_sums(batch, ids, counted, student_log_probs)` over this rank's
    micro-batches, in float64, all-reduced over ranks (a rank with no sequences adds zeros), with the
    model in eval mode. `student_log_probs()` runs the forward when called, so a teacher can be asked
    (and the ranks agree on its answer) before the forward. The sums stay on the model's device and are
    reduced there (`sum_over_ranks`): one host sync for the whole evaluation."""
    device = next(model.parameters()).device
    dtype = eval_dtype(device)
    micro_batch = eval_rows(micro_batch, sequences.shape[1], model.config.vocab_size, dtype)
    was_training = model.training
    model.eval()
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch]
        ids = to_device(torch.from_numpy(batch.astype(np.int64)), device)

        def student_log_probs(ids=ids) -> torch.Tensor:
            return torch.log_softmax(model(input_ids=ids).logits.to(dtype), dim=-1)

        sums += pack(batch_sums(batch, ids, _counted(mask, start, ids), student_log_probs), device)
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

    `teacher_log_probs(input_ids) -> np.ndarray [B, T, V]` returns full-vocabulary teacher log-probs.
    `mask` [N, T] (positions that count, e.g. those predicting completion tokens; None = all).
    """

    def batch_sums(batch, ids, counted, student_log_probs) -> list:
        answer = torch.from_numpy(np.asarray(_agreed(teacher_log_probs, batch)))
        log_p = to_device(answer, ids.device).to(eval_dtype(ids.device))
        log_q = student_log_probs()
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)[counted]
        nll = _label_nll(log_q, ids, counted)
        agree = (log_p.argmax(-1) == log_q.argmax(-1))[counted]
        return [
            kl.sum(),
            agree.sum(),
            kl.numel(),
            nll.sum(),
            _label_nll(log_p, ids, counted).sum(),
            nll.numel(),
        ]

    return _against_teacher(_summed_over_ranks(model, sequences, micro_batch, mask, batch_sums, 6), "kl")


def evaluate_student(
    model: torch.nn.Module, sequences: np.ndarray, micro_batch: int, mask: np.ndarray | None = None
) -> dict[str, float]:
    """With no teacher (`teacher.source=none`): the student's perplexity on the next tokens of the counted
    positions (`mask`, e.g. completion tokens; None = all). Collective, like `evaluate`."""

    def batch_sums(batch, ids, counted, student_log_probs) -> list:
        nll = _label_nll(student_log_probs(), ids, counted)
        return [nll.sum(), nll.numel()]

    nll, label_positions = _summed_over_ranks(model, sequences, micro_batch, mask, batch_sums, 2)
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

    def batch_sums(batch, ids, counted, student_log_probs) -> list:
        values, indices, target = (
            to_device(torch.from_numpy(np.asarray(x)), ids.device) for x in teacher_topk(batch)
        )
        dtype = eval_dtype(ids.device)
        log_p, log_q = values.to(dtype), student_log_probs()
        log_q_k = log_q.gather(-1, indices.long())
        p_tail = (1 - log_p.exp().sum(-1)).clamp_min(0)
        q_tail = (1 - log_q_k.exp().sum(-1)).clamp_min(torch.finfo(dtype).tiny)
        smallest = 1e-300 if dtype == torch.float64 else torch.finfo(dtype).tiny
        tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(smallest).log() - q_tail.log()), 0.0)
        kl = ((log_p.exp() * (log_p - log_q_k)).sum(-1) + tail)[counted]
        nll = _label_nll(log_q, ids, counted)
        teacher_nll = -target.double()[counted[:, :-1]]
        agree = (indices[..., 0].long() == log_q.argmax(-1))[counted]
        return [kl.sum(), agree.sum(), kl.numel(), nll.sum(), teacher_nll.sum(), nll.numel()]

    return _against_teacher(
        _summed_over_ranks(model, sequences, micro_batch, mask, batch_sums, 6), "kl_topk_bucket"
    )
