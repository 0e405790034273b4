"""How the teacher's full distribution p over the vocabulary becomes the few entries a reply carries
(`stream.sparsifier`).

- `topk`: the k most likely tokens with their exact log-probs. The loss puts the rest in one tail bucket,
  so it learns nothing about the order of the teacher's tail, and its value is biased low
  (`../shared/notes/topk-fidelity.md`: 5-14% at k=64).
- `sample`: `samples` tokens drawn from p with replacement; each distinct token carries its empirical
  frequency p^_i = count_i / samples. Forward KL(p^ || q) has, in expectation over the draws, the gradient
  of the full-vocabulary forward KL(p || q) (the gradient is q - p^, and E[p^] = p): random-sampling KD
  ("Sparse Logit Sampling", Anshumann et al., ACL 2025).
- `topk_sample`: the top-k exactly, plus `samples` draws from the rest of the distribution (p restricted
  to the tail and renormalised), each distinct tail token carrying P_tail x count_i / samples. Exact where
  the mass is, unbiased in the tail.

In both sampled schemes p^ sums to 1, so the loss's tail bucket is empty and the KD term is the
cross-entropy -sum p^ log q plus a constant. That constant differs from the true KL's; each position's
`offset` = sum over sampled entries of p^_i (log p_i - log p^_i) restores it, so loss value + offset is an
unbiased estimate of KL(p || q) at temperature 1 (the loss adds it; it carries no gradient).

Entries a row does not fill (a token drawn twice leaves a slot free) get log-prob -inf and a token id
that appears nowhere else in the row, so rows keep a fixed width of k + samples.

Draws are seeded from the request's token ids and `seed`, so the same window gets the same draws on every
replica, after a restart and on resume; the same window in a later epoch gets them too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

SPARSIFIERS = ("topk", "sample", "topk_sample")


@dataclass(frozen=True)
class Sparsifier:
    """`stream.sparsifier`, `stream.samples` and the run's seed, as a request carries them."""

    kind: str = "topk"
    samples: int = 0
    seed: int = 0


def sparsifier_of(stream, seed: int) -> Sparsifier | None:
    """What requests carry for the `stream` config (`stream.sparsifier`, `stream.samples`); None for top-k,
    which needs nothing. `seed` (the run's data seed) varies the draws between runs."""
    if stream.sparsifier == "topk":
        return None
    return Sparsifier(stream.sparsifier, int(stream.samples), int(seed))


def width(sparsifier: str, k: int, samples: int) -> int:
    """Entries per position of a reply: k, samples, or k + samples."""
    return {"topk": k, "sample": samples, "topk_sample": k + samples}[sparsifier]


def request_seed(input_ids: np.ndarray, seed: int) -> int:
    """The draws' seed for one request: from the window's token ids and the run's seed, so the same
    window gets the same draws wherever it runs (a whole-model replica, a pipeline's last stage)."""
    ids = np.ascontiguousarray(input_ids)
    return (seed * 1_000_003 + zlib.crc32(ids.tobytes()) + ids.size) % 2**63


def request_generator(input_ids: np.ndarray, seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `request_seed`."""
    return torch.Generator(device=device).manual_seed(request_seed(input_ids, seed))


@torch.no_grad()
def sparsify(
    log_probs: torch.Tensor, sparsifier: str, k: int, samples: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values [n, m] fp32, ids [n, m] int64, offset [n] fp32 or None for `topk`) from full-vocabulary
    log-probs [n, V]; values sorted descending along each row."""
    if sparsifier == "topk":
        values, ids = torch.topk(log_probs, k, dim=-1)
        return values, ids, None
    if sparsifier not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {sparsifier!r}; choose one of {', '.join(SPARSIFIERS)}")
    head_k = k if sparsifier == "topk_sample" else 0
    head_values, head_ids = torch.topk(log_probs, head_k, dim=-1)
    tail = log_probs.scatter(-1, head_ids, float("-inf"))  # the distribution the draws come from
    log_tail_mass = tail.logsumexp(-1, keepdim=True)  # log P_tail (0 with no head)
    weights = (tail - log_tail_mass).exp()
    empty = ~torch.isfinite(log_tail_mass)  # no mass left outside the head: draw anything, weigh it 0
    weights = torch.where(empty, torch.ones_like(weights), weights)
    draws = torch.multinomial(weights, samples, replacement=True, generator=generator)
    counts = torch.zeros_like(log_probs).scatter_add_(
        -1, draws, torch.ones_like(draws, dtype=log_probs.dtype)
    )
    counts.scatter_(-1, head_ids, -1.0)  # never chosen to fill a free slot: ids stay distinct in a row
    count, tail_ids = torch.topk(counts, samples, dim=-1)  # drawn tokens first, then distinct fillers
    drawn = count > 0
    log_p_hat = torch.where(
        drawn & ~empty, log_tail_mass + count.clamp(min=1).log() - np.log(samples), float("-inf")
    )
    log_p = log_probs.gather(-1, tail_ids)
    offset = torch.where(drawn & ~empty, log_p_hat.exp() * (log_p - log_p_hat), 0.0).sum(-1)
    values, order = torch.cat([head_values, log_p_hat], dim=-1).sort(dim=-1, descending=True)
    ids = torch.cat([head_ids, tail_ids], dim=-1).gather(-1, order)
    return values, ids, offset
