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
import torch.distributed as dist

from distill.stream.client import TeacherStreamError


def _agreed(teacher_log_probs, batch: np.ndarray) -> np.ndarray:
    """The teacher's answer, or TeacherStreamError on EVERY rank if any rank got none: the ranks agree
    before the model's forward (a collective under ZeRO-3) so none waits for a rank that has left."""
    try:
        answer, error = teacher_log_probs(batch), None
    except TeacherStreamError as e:
        answer, error = None, e
    failed = torch.tensor([float(error is not None)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(failed)
    if failed.item():
        raise error or TeacherStreamError("another rank lost the teacher during evaluation")
    return answer


def _counted(mask: np.ndarray | None, start: int, ids: torch.Tensor) -> torch.Tensor:
    """The positions of this micro-batch that count: `mask` rows from `start`, or all of them."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return torch.from_numpy(mask[start : start + len(ids)]).to(ids.device, torch.bool)


@torch.no_grad()
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
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # kl, agree, positions, nll, teacher_nll, label positions
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch]
        ids = torch.from_numpy(batch.astype(np.int64)).to(device)
        log_p = torch.tensor(_agreed(teacher_log_probs, batch), dtype=torch.float64, device=device)
        log_q = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        counted = _counted(mask, start, ids)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)[counted]
        labels, counted_labels = ids[:, 1:], counted[:, :-1]
        nll = -log_q[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)[counted_labels]
        teacher_nll = -log_p[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)[counted_labels]
        sums += torch.tensor(
            [
                kl.sum(),
                (log_p.argmax(-1) == log_q.argmax(-1))[counted].sum(),
                kl.numel(),
                nll.sum(),
                teacher_nll.sum(),
                nll.numel(),
            ],
            dtype=torch.float64,
        )
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    kl, agree, positions, nll, teacher_nll, label_positions = sums.tolist()
    return {
        "kl": kl / positions,
        "top1_agreement": agree / positions,
        "ppl": math.exp(nll / label_positions),
        "teacher_ppl": math.exp(teacher_nll / label_positions),
    }


@torch.no_grad()
def evaluate_student(
    model: torch.nn.Module, sequences: np.ndarray, micro_batch: int, mask: np.ndarray | None = None
) -> dict[str, float]:
    """With no teacher (`teacher.source=none`): the student's perplexity on the next tokens of the counted
    positions (`mask`, e.g. completion tokens; None = all). Collective, like `evaluate`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # nll, label positions
    for start in range(0, len(sequences), micro_batch):
        ids = torch.from_numpy(sequences[start : start + micro_batch].astype(np.int64)).to(device)
        counted = _counted(mask, start, ids)[:, :-1]
        log_q = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)
        nll = -log_q.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[counted]
        sums += torch.tensor([nll.sum(), nll.numel()], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    nll, label_positions = sums.tolist()
    return {"ppl": math.exp(nll / label_positions)}


@torch.no_grad()
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
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # kl, agree, positions, nll, teacher_nll, label positions
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch]
        ids = torch.from_numpy(batch.astype(np.int64)).to(device)
        values, indices, target = (torch.from_numpy(np.asarray(x)).to(device) for x in teacher_topk(batch))
        log_p = values.double()
        log_q = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        log_q_k = log_q.gather(-1, indices.long())
        p_tail = (1 - log_p.exp().sum(-1)).clamp_min(0)
        q_tail = (1 - log_q_k.exp().sum(-1)).clamp_min(torch.finfo(torch.float64).tiny)
        tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), 0.0)
        counted = _counted(mask, start, ids)
        kl = ((log_p.exp() * (log_p - log_q_k)).sum(-1) + tail)[counted]
        labels, counted_labels = ids[:, 1:], counted[:, :-1]
        nll = -log_q[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)[counted_labels]
        teacher_nll = -target.double()[counted_labels]
        sums += torch.tensor(
            [
                kl.sum(),
                (indices[..., 0].long() == log_q.argmax(-1))[counted].sum(),
                kl.numel(),
                nll.sum(),
                teacher_nll.sum(),
                nll.numel(),
            ],
            dtype=torch.float64,
        )
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    kl, agree, positions, nll, teacher_nll, label_positions = sums.tolist()
    return {
        "kl_topk_bucket": kl / positions,
        "top1_agreement": agree / positions,
        "ppl": math.exp(nll / label_positions),
        "teacher_ppl": math.exp(teacher_nll / label_positions),
    }
