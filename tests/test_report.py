"""The evaluation report (distill/report, launch/evaluate.py): its quality and speed numbers against
independent float64 references computed position by position here, and the whole command end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import distill.eval
from distill.models import tiny_llama
from distill.report.metrics import ECE_BINS, distribution_match, model_log_probs, student_alone
from distill.report.speed import measure, measure_in_fresh_process, weight_files

VOCAB, T, ROWS = 40, 12, 5


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
    return LlamaForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=(ROWS, T), dtype=np.uint16)


def full_log_probs(model: LlamaForCausalLM, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows.astype(np.int64))).logits.double()
    return torch.log_softmax(logits, -1).numpy()


def sparse_teacher(rows: np.ndarray) -> np.ndarray:
    """A synthetic teacher [N, T, V] whose distributions put zero probability on most of the vocabulary
    (a different random support per position), so KL(p||q) and JS must count p = 0 terms as 0."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(*rows.shape, VOCAB)) * 2
    logits[rng.random(logits.shape) < 0.6] = -np.inf
    logits[..., 0] = np.maximum(logits[..., 0], 0.0)  # at least one token in every support
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def reference(log_p: np.ndarray, log_q: np.ndarray, rows: np.ndarray, buckets: int) -> list[dict]:
    """Every metric by a plain loop over positions, all positions first, then each bucket."""

    def one(select) -> dict:
        kl = rkl = js = top1 = top5 = n = 0.0
        nll_q = nll_p = m = 0.0
        conf = {"q": [], "p": []}
        for i in range(rows.shape[0]):
            for t in range(T):
                if not select(t):
                    continue
                p, q = np.exp(log_p[i, t]), np.exp(log_q[i, t])
                mix = (p + q) / 2
                kl += sum(p[v] * (log_p[i, t, v] - log_q[i, t, v]) for v in range(VOCAB) if p[v] > 0)
                rkl += sum(q[v] * (log_q[i, t, v] - log_p[i, t, v]) for v in range(VOCAB) if q[v] > 0)
                js += 0.5 * sum(p[v] * math.log(p[v] / mix[v]) for v in range(VOCAB) if p[v] > 0)
                js += 0.5 * sum(q[v] * math.log(q[v] / mix[v]) for v in range(VOCAB) if q[v] > 0)
                best = int(np.argmax(p))
                top1 += int(np.argmax(q)) == best
                top5 += best in np.argsort(-q, kind="stable")[:5]
                n += 1
                if t + 1 < T:
                    nxt = int(rows[i, t + 1])
                    nll_q -= log_q[i, t, nxt]
                    nll_p -= log_p[i, t, nxt]
                    m += 1
                    for name, d in (("q", q), ("p", p)):
                        conf[name].append((d.max(), float(int(np.argmax(d)) == nxt)))
        out = {"kl": kl / n, "reverse_kl": rkl / n, "js": js / n, "top1_agreement": top1 / n}
        out |= {"top5_agreement": top5 / n, "ppl": math.exp(nll_q / m), "teacher_ppl": math.exp(nll_p / m)}
        for name, key in (("q", "ece"), ("p", "teacher_ece")):
            ece = 0.0
            for b in range(ECE_BINS):  # bins [b/15, (b+1)/15), the last one closed
                inside = [(c, ok) for c, ok in conf[name] if b / ECE_BINS <= c < (b + 1) / ECE_BINS]
                inside += [(c, ok) for c, ok in conf[name] if b == ECE_BINS - 1 and c == 1.0]
                if inside:
                    acc = sum(ok for _, ok in inside) / len(inside)
                    mean_conf = sum(c for c, _ in inside) / len(inside)
                    ece += len(inside) / len(conf[name]) * abs(acc - mean_conf)
            out[key] = ece
        return out

    return [one(lambda t: True)] + [one(lambda t, k=k: t * buckets // T == k) for k in range(buckets)]


def check(result: dict, expected: list[dict]) -> None:
    for got, want in zip([result, *result["buckets"]], expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("chunk_bytes", [None, 3 * VOCAB * 8], ids=["whole rows", "windows of 3 positions"])
def test_distribution_match_against_a_float64_reference(rows, monkeypatch, chunk_bytes):
    """Student and teacher two different float64 Llamas: every metric, overall and per bucket, equals the
    loop above; evaluated in windows of 3 positions (a tiny EVAL_CHUNK_BYTES) it is the same."""
    if chunk_bytes is not None:
        monkeypatch.setattr(distill.eval, "EVAL_CHUNK_BYTES", chunk_bytes)
    student, teacher = tiny_model(0), tiny_model(1)
    result = distribution_match(student, rows, model_log_probs(teacher), buckets=3, micro_batch=2)
    expected = reference(full_log_probs(teacher, rows), full_log_probs(student, rows), rows, buckets=3)
    check(result, expected)
    assert result["positions"] == ROWS * T and result["next_positions"] == ROWS * (T - 1)
    spans = [(b["first_position"], b["last_position"]) for b in result["buckets"]]
    assert spans == [(0, 3), (4, 7), (8, 11)]
    assert 0 < result["top1_agreement"] < result["top5_agreement"] <= 1  # two different models
    assert 0 < result["js"] < math.log(2)


def test_zero_probabilities_count_zero(rows):
    """A teacher with zero probability on most tokens: KL and JS finite and equal to the reference (the
    p = 0 terms count 0); reverse KL is infinite, as it is by definition when q > 0 where p = 0."""
    student = tiny_model(0)
    log_p = sparse_teacher(rows)
    result = distribution_match(student, rows, lambda batch, a: log_p[: len(batch), a : batch.shape[1]])
    expected = reference(log_p, full_log_probs(student, rows), rows, buckets=1)[0]
    for key in ("kl", "js", "top1_agreement", "top5_agreement", "ppl", "ece", "teacher_ece"):
        assert result[key] == pytest.approx(expected[key], rel=1e-9), key
    assert math.isinf(result["reverse_kl"])


def test_a_model_against_itself_and_alone(rows):
    """Against itself: KL, reverse KL and JS are 0, agreement is 1 and both ppl and ECE are the model's
    own; `student_alone` gives the same ppl and ECE without a teacher."""
    model = tiny_model(0)
    result = distribution_match(model, rows, model_log_probs(model), buckets=2)
    assert result["kl"] == pytest.approx(0, abs=1e-12) and result["js"] == pytest.approx(0, abs=1e-12)
    assert result["reverse_kl"] == pytest.approx(0, abs=1e-12)
    assert result["top1_agreement"] == 1 and result["top5_agreement"] == 1
    alone = student_alone(model, rows, buckets=2)
    assert alone["ppl"] == pytest.approx(result["ppl"], rel=1e-12) == result["teacher_ppl"]
    assert alone["ece"] == pytest.approx(result["ece"], rel=1e-12)
    assert [b["ppl"] for b in alone["buckets"]] == pytest.approx([b["ppl"] for b in result["buckets"]])


def test_vocabularies_that_differ_are_refused(rows):
    with pytest.raises(ValueError, match="vocabularies differ"):
        distribution_match(
            tiny_model(0), rows, lambda batch, a: np.zeros((len(batch), batch.shape[1] - a, 7))
        )


@pytest.fixture(scope="module")
def speed_model(tmp_path_factory, tiny_tokenizer_dir):
    """A random Llama of 3.3M parameters (13 MB in float32): big enough that its weights show in RSS."""
    return tiny_llama(
        tmp_path_factory.mktemp("speed-model"),
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        tokenizer_dir=tiny_tokenizer_dir,
    )


def test_speed_numbers_are_positive_and_consistent(speed_model):
    """Measured in a fresh process: parameters as the model counts them, disk bytes the weight files' sizes,
    peak memory at least the float32 weights, every rate positive and the settings recorded; measured in
    this process with 1 thread, the thread count is restored afterwards."""
    settings = {"prompt_len": 16, "new_tokens": 4, "batch": 2, "repeats": 2, "warmup": 1, "threads": 1}
    fresh = measure_in_fresh_process(speed_model, dtype="float32", **settings)
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(speed_model).parameters())
    assert fresh["parameters"] == params
    assert fresh["disk_bytes"] == sum(f.stat().st_size for f in weight_files(speed_model)) > 4 * params
    assert fresh["peak_memory_bytes"] >= 4 * params
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s"):
        assert fresh[key] > 0 and math.isfinite(fresh[key])
    assert fresh["threads"] == 1 and fresh["process"] == "fresh" and fresh["dtype"] == "float32"
    assert fresh["settings"]["new_tokens"] == 4

    threads = torch.get_num_threads()
    here = measure(speed_model, dtype="float32", **settings)
    assert torch.get_num_threads() == threads
    assert here["parameters"] == params and here["disk_bytes"] == fresh["disk_bytes"]
    with pytest.raises(ValueError, match="at least 2 generated tokens"):
        measure(speed_model, new_tokens=1)


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory) -> Path:
    """A student with its own tokenizer (a 300-entry BPE): the metrics that need shared ids are skipped."""
    from distill.models import tiny_tokenizer

    root = tmp_path_factory.mktemp("other-tokenizer")
    tokenizer = tiny_tokenizer(root / "tokenizer", vocab_size=300)
    return tiny_llama(
        root / "model", vocab_size=300, hidden_size=48, num_layers=2, seed=3, tokenizer_dir=tokenizer
    )


def evaluate_args(teacher: Path, students: list[Path], report_dir: Path, *extra: str) -> list[str]:
    """launch.evaluate on the tiny models at seconds-long settings."""
    return [
        "teacher=local",
        f"teacher.model.name_or_path={teacher}",
        f"students=[{','.join(map(str, students))}]",
        f"report_dir={report_dir}",
        "data.seq_len=32",
        "report.sequences=4",
        "report.buckets=2",
        "report.similarity.count=3",
        "report.similarity.prompt_tokens=8",
        "report.similarity.max_new_tokens=6",
        "report.speed.prompt_len=8",
        "report.speed.new_tokens=3",
        "report.speed.repeats=1",
        "report.speed.threads=1",
        *extra,
    ]


def test_evaluate_writes_one_report(tmp_path, tiny_teacher_dir, tiny_student_dir, other_tokenizer_student):
    """The whole command on the tiny teacher, a student sharing its tokenizer and one that does not: every
    section's numbers in metrics.json (which reloads), the tables in report.md, two PNG plots, the tables in
    the offline W&B run; the student with its own tokenizer has every metric but the shared-id ones."""
    from test_online import run_module

    report_dir = tmp_path / "report"
    students = [tiny_student_dir, other_tokenizer_student]
    proc = run_module(
        "launch.evaluate", evaluate_args(tiny_teacher_dir, students, report_dir, "logger=wandb")
    )
    assert proc.returncode == 0
    report = json.loads((report_dir / "metrics.json").read_text())
    teacher, (same, other) = report["teacher"], report["students"]
    assert same["shared_ids_skipped"] is None and "tokenizer differs" in other["shared_ids_skipped"]
    assert 0 < same["quality"]["kl"] and len(same["quality"]["buckets"]) == 2
    assert "kl" not in other["quality"] and other["quality"]["ppl"] > 1
    assert same["similarity"]["prompts"] == 3 and other["similarity"]["token_agreement"] is None
    assert 0 <= same["similarity"]["token_agreement"] <= 1 and 0 <= other["similarity"]["bleu"] <= 100
    for entry in [teacher, same, other]:
        assert entry["speed"]["parameters"] > 0 and entry["speed"]["decode_tokens_per_s"] > 0
    assert same["decode_speedup"] == pytest.approx(
        same["speed"]["decode_tokens_per_s"] / teacher["speed"]["decode_tokens_per_s"]
    )
    text = (report_dir / "report.md").read_text()
    for heading in ("## 1. Output similarity", "## 2. Distribution match", "## 3. Practical benefits",
                    "## 4. Sizes"):  # fmt: skip
        assert heading in text
    assert f"{same['quality']['kl']:.4f}" in text and "tokenizer differs" in text
    for png in ("quality_vs_size.png", "quality_vs_speed.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = {
        p.name.split("_")[0]: json.loads(p.read_text())
        for p in report_dir.glob("wandb/*/files/media/table/**/*.json")
    }
    assert tables, "no W&B table written"
    speed = next(t for name, t in tables.items() if name == "speed")
    assert speed["data"][0][1] == f"{teacher['speed']['parameters']:,}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["students=[]"], "students is empty"),
        (["students=[/no/such/student]"], "no such folder"),
        (["report.similarity.temperature=-1"], "report.similarity.temperature=-1"),
        (["report.similarity.prompts=EMPTY"], "holds no prompt"),
        (["report.buckets=99"], "report.buckets=99"),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(
    tmp_path, tiny_teacher_dir, tiny_student_dir, extra, message
):
    """One `error:` line naming the problem, exit code 2, and no report folder."""
    from test_online import run_module

    (tmp_path / "empty.txt").write_text("\n")
    extra = [e.replace("EMPTY", str(tmp_path / "empty.txt")) for e in extra]
    report_dir = tmp_path / "report"
    proc = run_module(
        "launch.evaluate", evaluate_args(tiny_teacher_dir, [tiny_student_dir], report_dir, *extra)
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not report_dir.exists()


def test_a_folder_without_config_is_refused(tmp_path, tiny_teacher_dir):
    from test_online import run_module

    (tmp_path / "not-a-model").mkdir()
    proc = run_module(
        "launch.evaluate", evaluate_args(tiny_teacher_dir, [tmp_path / "not-a-model"], tmp_path / "r")
    )
    assert proc.returncode == 2 and "has no config.json" in proc.stderr


FAST_REPORT = evaluate_args(Path("-"), [], Path("-"))[4:]  # the report.* and data settings above


def test_a_training_run_reports_at_its_end(tmp_path, attached_teacher, tiny_teacher_dir, tiny_student_dir):
    """report.enabled=true: after the run, <run_dir>/report holds the exported student against the run's
    teacher on the run's held-out data; without a teacher (teacher.source=none) the run is refused before it
    trains."""
    from test_online import run_module, tiny_overrides

    run_dir = tmp_path / "run"
    steps = [
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=2",
        "trainer.num_ranks=1",
    ]
    args = tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *steps, *attached_teacher)
    proc = run_module("launch.train", [*args, "report.enabled=true", *FAST_REPORT])
    assert proc.returncode == 0
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert report["teacher"]["folder"] == str(tiny_teacher_dir)
    assert [s["folder"] for s in report["students"]] == [str(run_dir / "student")]
    assert report["students"][0]["quality"]["kl"] > 0 and (run_dir / "report" / "report.md").is_file()
    # the Slurm scripts' last step (launch.summary) writes the same report
    (run_dir / "report" / "metrics.json").unlink()
    assert run_module("launch.summary", [str(run_dir)]).returncode == 0
    again = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert again["students"][0]["quality"]["kl"] == report["students"][0]["quality"]["kl"]

    refused = tmp_path / "refused"
    args = tiny_overrides(
        tiny_teacher_dir, tiny_student_dir, refused, "teacher.source=none", "report.enabled=true"
    )
    proc = run_module("launch.train", args)
    assert proc.returncode == 2 and "report.enabled with teacher.source=none" in proc.stderr
    assert not (refused / "checkpoints").exists()
