"""Synthetic data: teacher generation, prompt-masked packing, and training with no teacher (plain CE)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_online import ROOT, metrics, run_module, run_train, tiny_overrides
from transformers import AutoModelForCausalLM

from distill.data import TrainWindows
from distill.data.completions import prompt_ids
from distill.data.prompts import pydoc_prompts
from distill.losses.ce import cross_entropy, fused_cross_entropy


def student_ppl(student_dir: Path, sequences: np.ndarray, positions: np.ndarray | None = None) -> float:
    """Perplexity of an exported student on `sequences`, recomputed outside the training processes."""
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(sequences.astype(np.int64))
    with torch.no_grad():
        log_q = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    nll = -log_q.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    counted = torch.ones_like(nll, dtype=torch.bool) if positions is None else torch.from_numpy(positions)
    return float(torch.exp(nll[counted[:, : nll.shape[1]]].mean()))


def test_fused_cross_entropy_matches_float64_reference():
    """The chunked LM-head CE equals plain CE on full logits (value and both gradients), masked rows out."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    labels[:, -1] = -100
    mask = torch.rand(3, 7, generator=gen) > 0.4
    ref = cross_entropy(hidden @ weight.T, labels, mask, 11.0)
    out = fused_cross_entropy(hidden, weight, labels, mask, 11.0, chunk_size=4)
    counted = mask & (labels != -100)
    manual = torch.nn.functional.cross_entropy((hidden @ weight.T)[counted], labels[counted], reduction="sum")
    torch.testing.assert_close(ref.loss, manual / 11.0)
    torch.testing.assert_close(out.loss, ref.loss)
    assert out.metrics == pytest.approx(ref.metrics) and ref.metrics["tokens"] == counted.sum()
    for a, b in zip(
        torch.autograd.grad(ref.loss, (hidden, weight)), torch.autograd.grad(out.loss, (hidden, weight))
    ):
        torch.testing.assert_close(a, b)


def test_no_teacher_trains_on_plain_text(tiny_student_dir, tmp_path):
    """teacher.source=none on pydoc text (how specialist teachers are trained): no Ray, no teacher folder
    needed; held-out perplexity falls and the exported student reproduces the final eval."""
    run_dir = tmp_path / "plain"
    proc = run_train(
        tiny_overrides(
            Path("/no/teacher/needed"),
            tiny_student_dir,
            run_dir,
            "teacher.source=none",
            "trainer.max_steps=12",
            "trainer.eval_every=12",
            "trainer.lr=1e-2",
        )
    )
    assert proc.returncode == 0
    records = metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    evals = [r for r in records if "eval/ppl" in r]
    assert [r["step"] for r in evals] == [0, 12] and "eval/kl" not in evals[0]
    assert evals[-1]["eval/ppl"] < 0.8 * evals[0]["eval/ppl"]
    assert "student perplexity" in proc.stdout and "KL" not in proc.stdout
    heldout = np.load(run_dir / "data" / "heldout.npy")
    assert student_ppl(run_dir / "student", heldout) == pytest.approx(evals[-1]["eval/ppl"], rel=1e-5)
    assert json.loads((run_dir / "models.json").read_text())["teacher"] is None


# ---------------------------------------------------------------------------------------------- generation


def run_generate(overrides: list[str]) -> subprocess.CompletedProcess:
    return run_module("launch.generate", overrides)


def generation_overrides(teacher: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "teacher=local",
        f"teacher.model.name_or_path={teacher}",
        f"prompts={prompts}",
        f"out={out}",
        "ray.num_cpus=2",
        "sampling.max_new_tokens=40",
        "sampling.n=2",
        "sampling.temperature=0.9",
        *extra,
    ]


def samples(out: Path) -> dict[tuple[int, int], list[int]]:
    """(prompt index, sample index) -> completion token ids, over every part of a generation folder."""
    rows = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()
    result = {(r["prompt_index"], r["sample_index"]): r["completion_ids"] for r in rows}
    assert len(result) == len(rows), "a sample was written twice"
    return result


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """24 real instruction prompts (the README recipe's generator, cut short)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in pydoc_prompts()[:24]))
    return path


@pytest.fixture(scope="module")
def generated(tiny_teacher_dir, prompts_file, tmp_path_factory) -> Path:
    """The tiny teacher's completions (2 per prompt, top-k stored), batch size 2: the reference output."""
    out = tmp_path_factory.mktemp("generated") / "completions"
    proc = run_generate(
        generation_overrides(tiny_teacher_dir, prompts_file, out, "batch_size=2", "store=topk", "topk=4")
    )
    assert proc.returncode == 0
    return out


def test_sampling_does_not_depend_on_the_batch(tiny_teacher_dir):
    """A sample's tokens come from its own seed: the same alone, in a batch, or next to other prompts."""
    from distill.models import load_causal_lm, load_tokenizer
    from distill.teacher.generate import generate, sample_seed

    model = load_causal_lm(tiny_teacher_dir, dtype="float32", attn_implementation="sdpa").eval()
    tokenizer = load_tokenizer(tiny_teacher_dir)
    prompts = [prompt_ids(tokenizer, p) for p in pydoc_prompts()[:5]]
    seeds = [sample_seed(7, i, 0) for i in range(5)]
    sampling = dict(
        max_new_tokens=30, temperature=1.0, top_p=0.95, stop_ids=[tokenizer.eos_token_id], pad_id=0
    )
    together = generate(model, prompts, seeds, **sampling)
    alone = [generate(model, [p], [s], **sampling)[0] for p, s in zip(prompts, seeds)]
    reordered = generate(model, prompts[::-1], seeds[::-1], **sampling)[::-1]
    for a, b, c in zip(together, alone, reordered):
        assert a["completion_ids"] == b["completion_ids"] == c["completion_ids"]
    assert len({tuple(r["completion_ids"]) for r in together}) == 5  # and the samples differ
    other_seed = generate(model, prompts, [sample_seed(8, i, 0) for i in range(5)], **sampling)
    assert [r["completion_ids"] for r in other_seed] != [r["completion_ids"] for r in together]


def greedy_matches_transformers(model_dir: Path, count: int, max_new_tokens: int) -> None:
    """Greedy (temperature 0) batched, left-padded generation with our KV-cache loop equals Hugging Face
    `generate` run on each prompt alone."""
    from distill.models import load_causal_lm, load_tokenizer
    from distill.teacher.generate import generate

    model = load_causal_lm(model_dir, dtype="float32", attn_implementation="sdpa").eval()
    tokenizer = load_tokenizer(model_dir)
    prompts = [prompt_ids(tokenizer, p) for p in pydoc_prompts()[:count]]
    stop = tokenizer.eos_token_id
    ours = generate(model, prompts, [0] * count, max_new_tokens, 0.0, 1.0, [stop], tokenizer.pad_token_id)
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            reference = model.generate(
                torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop
            )[0, len(prompt) :].tolist()
        assert result["completion_ids"] == reference


def test_greedy_generation_matches_transformers(tiny_teacher_dir):
    greedy_matches_transformers(tiny_teacher_dir, count=4, max_new_tokens=24)


@pytest.mark.slow
def test_greedy_generation_matches_transformers_on_smollm2(smollm2_dir):
    greedy_matches_transformers(smollm2_dir, count=3, max_new_tokens=12)


def test_generation_is_deterministic_across_batch_sizes_and_a_kill(
    generated, tiny_teacher_dir, prompts_file, tmp_path
):
    """Batch size 3, SIGKILLed after its first part, then resumed: the same samples as one batch-2 run;
    finished parts are never rewritten and the records name the teacher and the parameters."""
    reference = samples(generated)
    assert len(reference) == 48
    rows = pq.read_table(sorted(generated.glob("part-*.parquet"))).to_pylist()
    meta = json.loads((generated / "generation.json").read_text())
    assert {r["teacher_sha256"] for r in rows} == {meta["teacher_sha256"]} and len(
        meta["teacher_sha256"]
    ) == 64
    assert json.loads(rows[0]["params"])["seed"] == 0 and rows[0]["teacher"] == str(tiny_teacher_dir)
    assert np.array(rows[0]["topk_values"]).shape == (len(rows[0]["completion_ids"]), 4)

    out = tmp_path / "completions"
    cmd = [sys.executable, "-m", "launch.generate"]
    cmd += generation_overrides(tiny_teacher_dir, prompts_file, out, "batch_size=3", "store=topk", "topk=4")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 0 < len(samples(out)) < 48, "the generator was not killed mid-run"

    assert (
        run_generate(
            generation_overrides(tiny_teacher_dir, prompts_file, out, "batch_size=3", "store=topk", "topk=4")
        ).returncode
        == 0
    )
    assert samples(out) == reference
    assert all(out.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in first.items())
    again = run_generate(generation_overrides(tiny_teacher_dir, prompts_file, out, "sampling.seed=1"))
    assert again.returncode != 0 and "other settings (sampling, store, topk differ)" in again.stderr


def test_generate_refuses_pipeline_replicas_before_compute(tiny_teacher_dir, prompts_file, tmp_path):
    proc = run_generate(
        generation_overrides(tiny_teacher_dir, prompts_file, tmp_path / "o", "teacher.stages=2")
    )
    assert proc.returncode != 0 and "teacher.stages=2: generation needs whole-model replicas" in proc.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- prompt-masked training


def test_prompt_tokens_carry_no_loss(generated, tiny_student_dir):
    """The packed mask marks exactly the completion tokens (checked against each example's prompt length);
    on the real objective the CE equals a float64 reference over those tokens alone, and changing the
    targets at prompt positions changes neither the loss nor the gradient."""
    from distill.data.completions import load_completions, pack_examples, position_mask
    from distill.losses import DistillationLoss
    from distill.models import load_causal_lm, load_tokenizer
    from distill.student.objective import StudentObjective
    from launch.student import next_token_labels

    tokenizer = load_tokenizer(tiny_student_dir)
    rows = load_completions(str(generated))[:6]
    tokens, targets = pack_examples(rows, tokenizer, seq_len=256)
    completions = []  # every example's completion tokens (+ EOS when it finished), in order
    for row in rows:
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        completions += completion + [tokenizer.eos_token_id] * row["finished"]
    assert tokens.tokens[targets].tolist() == completions  # the targets are exactly the completion tokens
    first_prompt = prompt_ids(tokenizer, rows[0]["prompt"])
    assert tokens.tokens[0, : len(first_prompt)].tolist() == first_prompt  # ... and right after its prompt
    assert not targets[0, : len(first_prompt)].any() and targets[0, len(first_prompt)]

    ids = torch.from_numpy(tokens.tokens.astype(np.int64))
    mask = torch.from_numpy(position_mask(targets))
    labels = next_token_labels(ids)
    model = load_causal_lm(tiny_student_dir, dtype="float32")
    with torch.no_grad():
        log_q = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    reference = -log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum() / 50.0
    scrambled = labels.clone()
    scrambled[~mask] = torch.randint(0, 256, (int((~mask).sum()),))
    for fused in (True, False):
        objective = StudentObjective(model, DistillationLoss(chunk_size=64), fused=fused)
        results = []
        for lab in (labels, scrambled):
            model.zero_grad()
            loss, _ = objective(ids, None, None, lab, mask, 50.0, 0)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(results[0][0].double(), reference, rtol=1e-5, atol=0)
        torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fine_tuning_on_generated_completions(generated, tiny_student_dir, tmp_path):
    """SFT through the CLI: teacher.source=none data=completions on the generator's folder. Held-out
    prompts are not trained on; loss and held-out completion perplexity fall; the exported student reloads
    and reproduces the final perplexity on the held-out completion tokens."""
    run_dir = tmp_path / "sft"
    proc = run_train(
        tiny_overrides(
            Path("/no/teacher/needed"),
            tiny_student_dir,
            run_dir,
            "teacher.source=none",
            "data=completions",
            f"data.source={generated}",
            "data.seq_len=128",
            "data.heldout_fraction=0.25",
            "trainer.micro_batch_size=2",
            "trainer.max_steps=12",
            "trainer.eval_every=12",
            "trainer.lr=1e-2",
        )
    )
    assert proc.returncode == 0
    data = run_dir / "data"
    heldout, targets = np.load(data / "heldout.npy"), np.load(data / "heldout_mask.npy")
    train = TrainWindows(data)  # the packed windows and their target-mask twin, read from the run's shards
    everything = np.arange(len(train))
    targets_train = train.target_mask(everything)
    assert targets_train.shape == train[everything].shape and targets_train.any()
    records = metrics(run_dir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    evals = [r for r in records if "eval/ppl" in r]
    assert evals[-1]["eval/ppl"] < 0.8 * evals[0]["eval/ppl"]
    positions = np.zeros_like(targets)
    positions[:, :-1] = targets[:, 1:]
    assert student_ppl(run_dir / "student", heldout, positions) == pytest.approx(
        evals[-1]["eval/ppl"], rel=1e-5
    )
