"""Held-out evaluation against the teacher's FULL distribution.

The training loss only sees the teacher's top-k (a biased-low estimate of the KL), so evaluation asks
the teacher for full-vocabulary log-probs and reports the exact KL(teacher‖student), top-1 agreement
and perplexity. Sums are all-reduced, so every rank evaluates its own shard of the held-out set.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, sequences: np.ndarray, teacher_log_probs, micro_batch: int
) -> dict[str, float]:
    """Metrics of `model` on this rank's `sequences` [N, T]; collective (every rank must call it).

    `teacher_log_probs(input_ids) -> np.ndarray [B, T, V]` returns full-vocabulary teacher log-probs.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # kl, agree, positions, nll, teacher_nll, label positions
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch]
        ids = torch.from_numpy(batch.astype(np.int64)).to(device)
        log_p = torch.tensor(teacher_log_probs(batch), dtype=torch.float64, device=device)
        log_q = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        labels = ids[:, 1:]
        nll = -log_q[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        teacher_nll = -log_p[:, :-1].gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        sums += torch.tensor(
            [
                kl.sum(),
                (log_p.argmax(-1) == log_q.argmax(-1)).sum(),
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
