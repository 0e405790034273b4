"""Batched sampling from a causal LM, reproducible per sample whatever batch it runs in.

Every sample draws its randomness from its own generator, seeded by the caller from (seed, prompt index,
sample index): one uniform number per new token, turned into a token by inverting the temperature /
top-p distribution at it. So a completion does not depend on which prompts share its batch, how many
replicas there are or whether the run was resumed. (Logits computed in batches of different shapes
differ by float rounding, ~1e-6; that changes a token only if a uniform lands that close to a step of
the distribution, or between two nearly tied greedy logits.) Prompts are left-padded; the KV cache
carries the batch forward one token at a time.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample's generator: a hash of (seed, prompt index, sample index)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])


def pick_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row of `logits` [B, V] at the row's uniform in [0, 1): the inverse CDF of
    softmax(logits / temperature) restricted to its top-p nucleus (temperature 0 = greedy)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # keep the smallest head >= top_p
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    seeds: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: list[int],
    pad_id: int,
    topk: int = 0,
) -> list[dict]:
    """Sample one completion per prompt (token ids). Returns per prompt: `completion_ids` (up to and
    including the first stop token), `finished` (a stop token ended it) and, with `topk` > 0, the teacher's
    top-k log-probs (T = 1, normalised over the full vocabulary) at every completion position:
    `topk_values` float32 [n, k] and `topk_ids` int32 [n, k], and the log-prob of the token drawn there,
    `token_logprob` float32 [n] (a soft-label cache's held-out teacher perplexity needs it)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    uniforms = torch.stack(
        [
            torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds
        ]
    )
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(sorted(set(stop_ids)), device=device)
    out = model(
        input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, top_values, top_ids, token_logprobs = [], [], [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        new = torch.where(done, pad_id, pick_tokens(logits, uniforms[:, step], temperature, top_p))
        if topk:
            log_probs = torch.log_softmax(logits, dim=-1)
            values, indices = log_probs.topk(topk, dim=-1)
            top_values.append(values.cpu())
            top_ids.append(indices.cpu())
            token_logprobs.append(log_probs.gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu())
        tokens.append(new.cpu())
        done |= torch.isin(new, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=new.unsqueeze(-1),
            attention_mask=attention,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    tokens = torch.stack(tokens, dim=1).tolist()
    stops = set(stop.tolist())
    results = []
    for row, seq in enumerate(tokens):
        end = next((t + 1 for t, token in enumerate(seq) if token in stops), len(seq))
        result = {"completion_ids": seq[:end], "finished": seq[end - 1] in stops}
        if topk:
            result["topk_values"] = torch.stack(top_values[:end], dim=0)[:, row].numpy()
            result["topk_ids"] = torch.stack(top_ids[:end], dim=0)[:, row].to(torch.int32).numpy()
            result["token_logprob"] = torch.stack(token_logprobs[:end], dim=0)[:, row].numpy()
        results.append(result)
    return results
