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
    return sequences, mask, student, log_p, log_q, teacher


def teacher_of(teacher, asked: list | None = None):
    """`teacher_log_probs(rows, start)` as evaluation calls it: the float64 teacher run on the rows it is
    sent (cut at the window's end), log-probs of positions start.. (`asked` records (rows, end, start))."""

    def full(batch: np.ndarray, start: int) -> np.ndarray:
        if asked is not None:
            asked.append((len(batch), batch.shape[1], start))
        with torch.no_grad():
            logits = teacher(input_ids=torch.from_numpy(batch.astype(np.int64))).logits.double()
        return torch.log_softmax(logits[:, start:], -1).numpy()

    return full


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


def cached_topk(sequences: np.ndarray, log_p: torch.Tensor, k: int):
    """`teacher_topk(rows)` as a cache answers it: top-k [B, T, k], each next token's log-prob [B, T - 1]."""
    row = {tuple(s): i for i, s in enumerate(sequences.tolist())}

    def teacher_topk(batch):
        rows = log_p[[row[tuple(s)] for s in batch.tolist()]]
        values, indices = rows.topk(k, dim=-1)
        next_ids = torch.from_numpy(batch[:, 1:].astype(np.int64)).unsqueeze(-1)
        return values.numpy(), indices.numpy(), rows[:, :-1].gather(-1, next_ids).squeeze(-1).numpy()

    return teacher_topk


def test_evaluate_matches_the_reference(setup):
    from distill.eval import evaluate

    sequences, mask, student, log_p, log_q, teacher = setup
    got = evaluate(student, sequences, teacher_of(teacher), micro_batch=2, mask=mask)
    assert got == pytest.approx(reference(sequences, mask, log_p, log_q), rel=1e-9)
    assert 0.2 < got["top1_agreement"] < 0.9
    assert student.training is False  # left as found


def test_evaluation_chunks_fit_its_memory_budget(setup, monkeypatch):
    """Evaluation chunks keep one side's vocabulary-wide log-probs within the budget: fewer rows per batch,
    and a row too long for it a window of positions at a time (the teacher sent the row cut at the
    window's end). The metrics are the same sums, chunk by chunk."""
    from distill import eval as ev

    assert ev.eval_chunks(64, 4096, 128_256, torch.float32) == (1, 1046)  # a 2 GiB row: 4 windows
    assert ev.eval_chunks(8, 256, 49_152, torch.float64) == (5, 256)  # SmolLM2 rows of 96 MiB in float64
    assert ev.eval_chunks(8, 32, 256, torch.float64) == (8, 32)  # small rows: the micro-batch as asked
    assert ev.eval_chunks(1, 10, 2**40, torch.float64) == (1, 1)  # never below one position
    sequences, mask, student, log_p, log_q, teacher = setup
    expected = reference(sequences, mask, log_p, log_q)

    asked: list = []
    monkeypatch.setattr(ev, "EVAL_CHUNK_BYTES", T * VOCAB * 8)  # one float64 row
    got = ev.evaluate(student, sequences, teacher_of(teacher, asked), micro_batch=4, mask=mask)
    assert asked == [(1, T, 0)] * len(sequences)
    assert got == pytest.approx(expected, rel=1e-9)

    asked.clear()
    monkeypatch.setattr(ev, "EVAL_CHUNK_BYTES", 4 * VOCAB * 8 + 7)  # 4 positions: windows 0-3, 4-7, 8
    got = ev.evaluate(student, sequences, teacher_of(teacher, asked), micro_batch=4, mask=mask)
    assert asked == [(1, 4, 0), (1, 8, 4), (1, 9, 8)] * len(sequences)
    assert got == pytest.approx(expected, rel=1e-9)
    student_only = ev.evaluate_student(student, sequences, 4, mask)
    assert student_only == pytest.approx({"ppl": expected["ppl"]}, rel=1e-9)
    cached = ev.evaluate_cached(student, sequences, cached_topk(sequences, log_p, VOCAB), 4, mask)
    expected["kl_topk_bucket"] = expected.pop("kl")
    assert cached == pytest.approx(expected, rel=1e-9)


def test_evaluate_student_and_cached_match_the_reference(setup):
    from distill.eval import evaluate_cached, evaluate_student

    sequences, mask, student, log_p, log_q, _ = setup
    expected = reference(sequences, mask, log_p, log_q)
    assert evaluate_student(student, sequences, 2, mask) == pytest.approx({"ppl": expected["ppl"]}, rel=1e-9)

    # k = the whole vocabulary: nothing in the tail bucket, the exact KL
    whole = evaluate_cached(student, sequences, cached_topk(sequences, log_p, VOCAB), 2, mask)
    expected["kl_topk_bucket"] = expected.pop("kl")
    assert whole == pytest.approx(expected, rel=1e-9)
    # k = 5: a lower bound of the exact KL (merging outcomes never increases a KL), same perplexities
    five = evaluate_cached(student, sequences, cached_topk(sequences, log_p, 5), 2, mask)
    assert 0 < five["kl_topk_bucket"] < whole["kl_topk_bucket"]
    assert five["ppl"] == pytest.approx(whole["ppl"], rel=1e-12)
    assert five["teacher_ppl"] == pytest.approx(whole["teacher_ppl"], rel=1e-12)


CAPPED_EVAL = """
import resource, sys, numpy as np, torch
from transformers import LlamaConfig, LlamaForCausalLM
from distill import eval as ev
from distill.teacher.actor import full_log_probs_reply
ev.EVAL_CHUNK_BYTES = int(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=16384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
student, teacher = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()

def full(rows, start):  # what a teacher actor answers (TeacherActor.full_log_probs), in this process
    with torch.no_grad():
        final = teacher.get_decoder()(input_ids=torch.from_numpy(rows.astype(np.int64))).last_hidden_state
        return full_log_probs_reply(final[:, start:], teacher.get_output_embeddings(), torch.float32)

rows = np.random.default_rng(0).integers(0, 16384, size=(2, 2048), dtype=np.uint16)
ev.evaluate(student, rows[:, :16], full, 1)  # first-call allocations before the cap
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 128 * 2**20, resource.RLIM_INFINITY))
try:
    got = ev.evaluate(student, rows, full, 1)
    print("answered", round(got["kl"], 3))
except (RuntimeError, MemoryError) as error:  # torch's 'can't allocate memory', numpy's 'Unable to allocate'
    print("refused", str(error).splitlines()[0])
"""


def test_evaluation_of_long_rows_fits_a_memory_cap_that_a_whole_row_does_not():
    """Held-out rows of 2,048 positions over a 16,384-token vocabulary, in a fresh process whose address
    space is capped at 128 MiB above what it has mapped: windows of 64 positions (8 MiB of float64
    log-probs a side) answer, teacher and student in the same process; a whole row at once (256 MiB of
    float64 student log-probs, 128 MiB of teacher reply) cannot allocate."""
    from conftest import run_script

    answered = run_script(CAPPED_EVAL, str(64 * 16384 * 8))
    assert answered.startswith("answered") and float(answered.split()[1]) > 0, answered
    assert run_script(CAPPED_EVAL, str(2**40)).startswith("refused")
