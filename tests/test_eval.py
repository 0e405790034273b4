"""Held-out metrics (distill/eval.py) against a position-by-position float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, T = 50, 9


def tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    sequences = rng.integers(0, VOCAB, size=(5, T), dtype=np.uint16)  # micro-batch 2: a short last one
    mask = rng.random((5, T)) < 0.7
    # float64 models: the reference and evaluate() batch differently, and float32 matmuls would differ in
    # the last bits with the thread count
    student, teacher = tiny_model(0).double(), tiny_model(0).double()
    with torch.no_grad():  # a perturbed copy: agreement well between 0 and 1
        for w in teacher.parameters():
            w.add_(0.01 * torch.randn_like(w))
        ids = torch.from_numpy(sequences.astype(np.int64))
        log_q = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
        log_p = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
    return sequences, mask, student, log_p, log_q


def reference(sequences, mask, log_p, log_q) -> dict[str, float]:
    """Loop over every counted position: KL and top-1 where counted, next-token NLL where one follows."""
    kl = agree = positions = nll = teacher_nll = labels = 0.0
    for n in range(len(sequences)):
        for t in range(T):
            if not mask[n, t]:
                continue
            p, q = log_p[n, t].tolist(), log_q[n, t].tolist()
            kl += sum(math.exp(a) * (a - b) for a, b in zip(p, q))
            agree += int(np.argmax(p) == np.argmax(q))
            positions += 1
            if t + 1 < T:
                nxt = int(sequences[n, t + 1])
                nll, teacher_nll, labels = nll - q[nxt], teacher_nll - p[nxt], labels + 1
    return {
        "kl": kl / positions,
        "top1_agreement": agree / positions,
        "ppl": math.exp(nll / labels),
        "teacher_ppl": math.exp(teacher_nll / labels),
    }


def test_evaluate_matches_the_reference(setup):
    from distill.eval import evaluate

    sequences, mask, student, log_p, log_q = setup
    row = {tuple(s): i for i, s in enumerate(sequences.tolist())}
    full = lambda batch: log_p[[row[tuple(s)] for s in batch.tolist()]].numpy()  # noqa: E731
    got = evaluate(student, sequences, full, micro_batch=2, mask=mask)
    assert got == pytest.approx(reference(sequences, mask, log_p, log_q), rel=1e-9)
    assert 0.2 < got["top1_agreement"] < 0.9
    assert student.training is False  # left as found


def test_evaluation_takes_as_many_rows_as_fit_its_memory_budget(setup, monkeypatch):
    """Rows per evaluation batch shrink so one side's [rows, T, V] log-probs stay within the budget (never
    below one row); the metrics are the same sums, batch by batch."""
    from distill import eval as ev

    assert ev.eval_rows(64, 4096, 128_256, torch.float32) == 1  # a 2 GiB row: one at a time
    assert ev.eval_rows(8, 256, 49_152, torch.float64) == 5  # SmolLM2 rows of 96 MiB in float64
    assert ev.eval_rows(8, 32, 256, torch.float64) == 8  # small rows: the micro-batch as asked
    sequences, mask, student, log_p, log_q = setup
    row = {tuple(s): i for i, s in enumerate(sequences.tolist())}
    asked = []

    def full(batch):
        asked.append(len(batch))
        return log_p[[row[tuple(s)] for s in batch.tolist()]].numpy()

    monkeypatch.setattr(ev, "EVAL_CHUNK_BYTES", T * VOCAB * 8)  # one float64 row
    got = ev.evaluate(student, sequences, full, micro_batch=4, mask=mask)
    assert asked == [1] * len(sequences)
    assert got == pytest.approx(reference(sequences, mask, log_p, log_q), rel=1e-9)


def test_evaluate_student_and_cached_match_the_reference(setup):
    from distill.eval import evaluate_cached, evaluate_student

    sequences, mask, student, log_p, log_q = setup
    expected = reference(sequences, mask, log_p, log_q)
    assert evaluate_student(student, sequences, 2, mask) == pytest.approx({"ppl": expected["ppl"]}, rel=1e-9)

    row = {tuple(s): i for i, s in enumerate(sequences.tolist())}

    def topk(k):
        def teacher_topk(batch):
            rows = log_p[[row[tuple(s)] for s in batch.tolist()]]
            values, indices = rows.topk(k, dim=-1)
            next_ids = torch.from_numpy(batch[:, 1:].astype(np.int64)).unsqueeze(-1)
            return values.numpy(), indices.numpy(), rows[:, :-1].gather(-1, next_ids).squeeze(-1).numpy()

        return teacher_topk

    # k = the whole vocabulary: nothing in the tail bucket, the exact KL
    whole = evaluate_cached(student, sequences, topk(VOCAB), 2, mask)
    expected["kl_topk_bucket"] = expected.pop("kl")
    assert whole == pytest.approx(expected, rel=1e-9)
    # k = 5: a lower bound of the exact KL (merging outcomes never increases a KL), same perplexities
    five = evaluate_cached(student, sequences, topk(5), 2, mask)
    assert 0 < five["kl_topk_bucket"] < whole["kl_topk_bucket"]
    assert five["ppl"] == pytest.approx(whole["ppl"], rel=1e-12)
    assert five["teacher_ppl"] == pytest.approx(whole["teacher_ppl"], rel=1e-12)
