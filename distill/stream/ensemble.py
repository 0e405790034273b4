"""A per-token mixture of teachers that share a tokenizer, on their sparse top-k replies.

Each teacher i sends its top-k log-probs (normalised over the full vocabulary) and so, implicitly, a tail
mass 1 - Σ_topk p_i. The mixture is p(v) = Σ_i w_i p_i(v). On the union U of the teachers' ids, teacher
i's probability of an id outside its own top-k is unknown (only bounded by its k-th probability), so its
share there is counted in the tail, never guessed:

    mass(v)     = Σ_i w_i p_i(v) [v in topk_i]          for v in U
    tail        = 1 - Σ_{v in U} mass(v)                 (= Σ_i w_i tail_i)

The reply is the k ids of U with the largest mass, as log-probs, in the usual `TeacherOutput` format: the
loss's `tail: bucket` then puts everything else (the teachers' own tails and the ids of U that did not
make the cut) in the (k+1)-th entry, so the losses work unchanged. |U| >= k always (each teacher alone
has k distinct ids), so the reply never needs padding.

Weights: `fixed` uses the configured weights (normalised) for every token; `confidence` weighs each
teacher per token by its top-1 probability (normalised over the teachers), so the teacher that is surer
of the next token counts more.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.teacher.actor import TeacherOutput, _from_numpy, _to_numpy

WEIGHTINGS = ("fixed", "confidence")


def token_weights(values: list[torch.Tensor], weights: list[float] | None, weighting: str) -> torch.Tensor:
    """Per-token weights [n_teachers, ...] summing to 1 over the teachers. `values` are top-k log-probs."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"ensemble weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    n = len(values)
    fixed = torch.tensor(weights if weights is not None else [1.0] * n, dtype=values[0].dtype)
    fixed = fixed / fixed.sum()
    shape = values[0].shape[:-1]
    if weighting == "fixed":
        return fixed.view(n, *[1] * len(shape)).expand(n, *shape)
    confidence = torch.stack([v.max(-1).values.exp() for v in values]) * fixed.view(n, *[1] * len(shape))
    return confidence / confidence.sum(0, keepdim=True)


def mix_topk(
    values: list[torch.Tensor],
    indices: list[torch.Tensor],
    k: int,
    weights: list[float] | None = None,
    weighting: str = "fixed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture of teachers' top-k log-probs ([..., k_i] each) -> its top-k (log-probs, ids) [..., k]."""
    dtype = torch.float64 if values[0].dtype == torch.float64 else torch.float32
    values = [v.to(dtype) for v in values]
    w = token_weights(values, weights, weighting)  # [n, ...]
    mass = torch.cat([w[i].unsqueeze(-1) * v.exp() for i, v in enumerate(values)], dim=-1)
    ids = torch.cat([ix.long() for ix in indices], dim=-1)
    # sum the masses of equal ids: sort the ids, then add each run of equal ids into its first slot
    ids, order = ids.sort(dim=-1)
    mass = mass.gather(-1, order)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    segment = starts.long().cumsum(-1) - 1
    summed = torch.zeros_like(mass).scatter_add_(-1, segment, mass)
    seg_ids = torch.zeros_like(ids).scatter_(-1, segment, ids)  # every id of a run writes the same value
    top_mass, slot = summed.topk(k, dim=-1)
    return top_mass.log(), seg_ids.gather(-1, slot)


def mix_outputs(
    outputs: list[TeacherOutput], request_id: int, k: int, weights: list[float] | None, weighting: str
) -> TeacherOutput:
    """`mix_topk` on the teachers' replies, packed as one reply in their dtypes (no hidden states)."""
    first = outputs[0]
    values = [_from_numpy(o.values, o.values_dtype).float() for o in outputs]
    indices = [torch.from_numpy(o.indices.astype(np.int64)) for o in outputs]
    mixed, ids = mix_topk(values, indices, k, weights, weighting)
    return TeacherOutput(
        request_id,
        _to_numpy(mixed, first.values_dtype),
        ids.numpy().astype(first.indices.dtype),
        first.values_dtype,
        compute_s=max(o.compute_s for o in outputs),
    )


def mix_full_log_probs(
    log_probs: list[np.ndarray], weights: list[float] | None, weighting: str
) -> np.ndarray:
    """The mixture over the full vocabulary (evaluation): log Σ_i w_i p_i, confidence from the full p_i."""
    lp = [torch.from_numpy(np.asarray(x)).double() for x in log_probs]
    w = token_weights(lp, weights, weighting)
    stacked = torch.stack(lp) + w.log().unsqueeze(-1)
    return torch.logsumexp(stacked, dim=0).float().numpy()
