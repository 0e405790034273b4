"""How closely a student's next-token distributions match its teacher's on held-out token rows, and how well
each model predicts and is calibrated on the next token: the quality columns of the evaluation report.

Computed in float64 on the CPU, one chunk of the rows at a time: `distill.eval.eval_chunks` for float64
(several whole rows when their [rows, T, V] log-probs fit `distill.eval.EVAL_CHUNK_BYTES`, else one row a
window of positions at a time), so neither side's vocabulary-wide log-probs exceed that budget whatever the
rows' length and the vocabulary; the sums accumulate in float64 per position bucket.

At position t of a row, with p the teacher's next-token distribution and q the student's:
- forward KL = Σ_v p (log p − log q), reverse KL = Σ_v q (log q − log p);
- Jensen-Shannon = ½ KL(p‖m) + ½ KL(q‖m) with m = (p + q) / 2, natural log (so at most log 2);
  a term whose probability is 0 counts 0;
- top-1 agreement: the student's most likely token is the teacher's most likely token;
- top-5 agreement: the teacher's most likely token is among the student's 5 most likely tokens;
  (ties at the top go to the lowest id, as torch.argmax and torch.topk break them);
- perplexity of a model = exp(mean of −log prob(next token));
- expected calibration error (ECE) of a model on the next token: confidence = its largest probability,
  correct = its most likely token is the next token; the positions fall into 15 equal-width confidence
  bins ([0, 1/15), ..., [14/15, 1]) and ECE = Σ_bins (bin count / positions) |accuracy − mean confidence|.
The first four average over every position, perplexity and ECE over the positions that have a next token
(a row's last position has none). Each is reported over all positions and per position bucket: with
`buckets` = K, position t of a row of T positions belongs to bucket floor(t K / T) (K = 2: the first half
of the sequence and the second).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from distill.eval import _StudentLogProbs, eval_chunks

ECE_BINS = 15
TOP_K = 5

# teacher_log_probs(rows [B, b] cut at a window's end b, a) -> log-probs [B, b - a, V] of positions a..b-1:
# `model_log_probs(teacher)` for a model in this process, or the Ray pool's `TeacherStream.full_log_probs`
TeacherLogProbs = Callable[[np.ndarray, int], np.ndarray]


def model_log_probs(model: torch.nn.Module) -> TeacherLogProbs:
    """`teacher_log_probs` of a causal LM in this process: it runs on the rows it is sent, and its head only
    on the positions asked for, log-softmaxed in float64 and returned on the CPU."""

    def teacher_log_probs(rows: np.ndarray, start: int) -> np.ndarray:
        ids = torch.from_numpy(rows.astype(np.int64)).to(next(model.parameters()).device)
        with torch.no_grad():
            return _StudentLogProbs(model, ids, torch.float64)(start, rows.shape[1]).cpu().numpy()

    return teacher_log_probs


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log r) over the last axis, a term with p = 0 counted 0 (also where log p = −inf)."""
    return torch.where(p > 0, p * (log_p - log_r), 0.0).sum(-1)


class _Sums:
    """float64 sums per position bucket, by name, and per model the confidence histogram of its ECE."""

    def __init__(self, seq_len: int, buckets: int):
        if not 1 <= buckets <= seq_len:
            raise ValueError(f"buckets={buckets} must be in [1, seq_len={seq_len}]")
        self.seq_len, self.buckets = seq_len, buckets
        self.sums: dict[str, np.ndarray] = {}  # name -> [buckets]
        self.bins: dict[
            str, np.ndarray
        ] = {}  # model -> [buckets, ECE_BINS, 3]: count, Σ confidence, Σ correct

    def bucket_of(self, a: int, n: int) -> torch.Tensor:
        """The buckets of positions a..a+n-1."""
        return torch.arange(a, a + n) * self.buckets // self.seq_len

    def add(self, name: str, values: torch.Tensor, a: int) -> None:
        """Add `values` [B, n] of positions a..a+n-1 to `name`'s sum in each position's bucket."""
        per_bucket = torch.zeros(self.buckets, dtype=torch.float64)
        per_bucket.index_add_(0, self.bucket_of(a, values.shape[1]), values.to(torch.float64).sum(0))
        self.sums.setdefault(name, np.zeros(self.buckets))[:] += per_bucket.numpy()

    def add_next_token(self, model: str, log_probs: torch.Tensor, next_ids: torch.Tensor, a: int) -> None:
        """Perplexity and calibration sums of `model` at positions a..a+n-1: its `log_probs` [B, n, V] there
        and the next tokens `next_ids` [B, n]."""
        self.add(f"{model}nll", -log_probs.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1), a)
        log_confidence, top = log_probs.max(-1)
        confidence = log_confidence.exp()
        correct = (top == next_ids).to(torch.float64)
        bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
        flat = (self.bucket_of(a, bins.shape[1]) * ECE_BINS + bins).flatten()
        size = self.buckets * ECE_BINS
        counts = [
            torch.bincount(flat, weights=w.flatten(), minlength=size)
            for w in (torch.ones_like(confidence), confidence, correct)
        ]
        histogram = torch.stack(counts, -1).reshape(self.buckets, ECE_BINS, 3).numpy()
        self.bins.setdefault(model, np.zeros((self.buckets, ECE_BINS, 3)))[:] += histogram

    def metrics(self, pair: bool, models: tuple[str, ...], selected: list[int]) -> dict:
        """The module docstring's metrics over the buckets `selected` (None where nothing was counted)."""
        total = {name: float(v[selected].sum()) for name, v in self.sums.items()}
        out: dict = {}
        if pair:
            n = total["positions"]
            out["positions"] = int(n)
            for name, key in [
                ("kl", "kl"),
                ("reverse_kl", "reverse_kl"),
                ("js", "js"),
                ("top1", "top1_agreement"),
                ("top5", "top5_agreement"),
            ]:
                out[key] = total[name] / n if n else None
        n = total["next_positions"]
        out["next_positions"] = int(n)
        for model in models:
            out[f"{model}ppl"] = math.exp(total[f"{model}nll"] / n) if n else None
            count, confidence, correct = self.bins[model][selected].sum(0).T
            out[f"{model}ece"] = float(np.abs(correct - confidence).sum() / n) if n else None
        return out

    def result(self, pair: bool, models: tuple[str, ...]) -> dict:
        """All positions' metrics, plus `buckets`: each bucket's first and last position and metrics."""
        out = self.metrics(pair, models, list(range(self.buckets)))
        positions = np.arange(self.seq_len)
        out["buckets"] = []
        for k in range(self.buckets):
            inside = positions[positions * self.buckets // self.seq_len == k]
            span = {"first_position": int(inside[0]), "last_position": int(inside[-1])}
            out["buckets"].append({**span, **self.metrics(pair, models, [k])})
        return out


@torch.no_grad()
def _chunks(
    model: torch.nn.Module, rows: np.ndarray, micro_batch: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, int, int, torch.Tensor]]:
    """Each evaluation chunk of `rows` [N, T]: (its rows as given [B, T], their ids [B, T] on the CPU, a, b,
    the model's float64 log-probs of positions a..b-1 on the CPU [B, b - a, V]); the model in eval mode
    meanwhile (left as found), its decoder run once per chunk of rows and its head once per window."""
    device = next(model.parameters()).device
    seq_len = rows.shape[1]
    n_rows, width = eval_chunks(micro_batch, seq_len, model.config.vocab_size, torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), n_rows):
            batch = rows[start : start + n_rows]
            ids = torch.from_numpy(batch.astype(np.int64))
            log_probs = _StudentLogProbs(model, ids.to(device), torch.float64)
            for a in range(0, seq_len, width):
                b = min(a + width, seq_len)
                yield batch, ids, a, b, log_probs(a, b).cpu()
    finally:
        model.train(was_training)


def _add_next_tokens(
    sums: _Sums, ids: torch.Tensor, a: int, b: int, log_probs: dict[str, torch.Tensor]
) -> None:
    """Next-token sums of window a..b-1 for each model (`log_probs`: model -> [B, b - a, V]), over the
    window's positions that have a next token."""
    n = min(b, ids.shape[1] - 1) - a
    if n <= 0:
        return
    next_ids = ids[:, a + 1 : a + 1 + n]
    sums.add("next_positions", torch.ones(next_ids.shape, dtype=torch.float64), a)
    for model, values in log_probs.items():
        sums.add_next_token(model, values[:, :n], next_ids, a)


def distribution_match(
    student: torch.nn.Module,
    rows: np.ndarray,
    teacher_log_probs: TeacherLogProbs,
    buckets: int = 1,
    micro_batch: int = 8,
) -> dict:
    """The module docstring's metrics of `student` against the teacher on held-out `rows` [N, T] (token ids
    both tokenise alike): kl, reverse_kl, js, top1_agreement, top5_agreement (over `positions`), ppl, ece,
    teacher_ppl, teacher_ece (over `next_positions`), and the same per position bucket in `buckets`.

    `teacher_log_probs(rows cut at b, a)` -> [B, b - a, V] is asked once per evaluation chunk, exactly as
    `distill.eval.evaluate` asks it; its vocabulary must be the student's."""
    sums = _Sums(rows.shape[1], buckets)
    for batch, ids, a, b, log_q in _chunks(student, rows, micro_batch):
        log_p = torch.from_numpy(np.asarray(teacher_log_probs(batch[:, :b], a), dtype=np.float64))
        if log_p.shape != log_q.shape:
            raise ValueError(
                f"the teacher's log-probs of positions {a}..{b - 1} have shape {tuple(log_p.shape)}, the "
                f"student's {tuple(log_q.shape)}: their vocabularies differ"
            )
        p, q = log_p.exp(), log_q.exp()
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)
        teacher_top = log_p.argmax(-1, keepdim=True)
        sums.add("positions", torch.ones(log_p.shape[:2], dtype=torch.float64), a)
        sums.add("kl", _kl(p, log_p, log_q), a)
        sums.add("reverse_kl", _kl(q, log_q, log_p), a)
        sums.add("js", (_kl(p, log_p, log_m) + _kl(q, log_q, log_m)) / 2, a)
        sums.add("top1", (log_q.argmax(-1, keepdim=True) == teacher_top).squeeze(-1), a)
        top5 = log_q.topk(min(TOP_K, log_q.shape[-1]), dim=-1).indices
        sums.add("top5", (top5 == teacher_top).any(-1), a)
        _add_next_tokens(sums, ids, a, b, {"": log_q, "teacher_": log_p})
    return sums.result(pair=True, models=("", "teacher_"))


def student_alone(model: torch.nn.Module, rows: np.ndarray, buckets: int = 1, micro_batch: int = 8) -> dict:
    """A model without a teacher to compare with (another tokenizer, or the teacher itself): its ppl and ece
    on `rows` [N, T] (over `next_positions`), and the same per position bucket in `buckets`."""
    sums = _Sums(rows.shape[1], buckets)
    for _, ids, a, b, log_q in _chunks(model, rows, micro_batch):
        _add_next_tokens(sums, ids, a, b, {"": log_q})
    return sums.result(pair=False, models=("",))
