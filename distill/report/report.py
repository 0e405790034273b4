"""The evaluation report: students against their teacher on held-out data, in one folder.

`check` refuses bad input before any model loads; `evaluate` measures, for the teacher and every student:
1. output similarity: both generate from the same held-out prompts, the student's outputs scored against
   the teacher's (similarity.py), and optionally by a judge model;
2. distribution match on held-out rows, over all positions and per position bucket (metrics.py);
3. size, peak memory, prefill and decode speed and time to first token, each model measured on the same
   device in one run (speed.py), with the decode speed-up against the 2-4x a distilled student should give.
`write` puts metrics.json (every number, the command, the machine), report.md (the tables), the plots of
quality against size and speed, and the same tables and plots in W&B (`logger`), into `report_dir`.

Models are evaluated one at a time in this process: the teacher, then each student while the teacher stays
loaded (its log-probs are the reference of the distribution match), so the teacher and one student must fit
the device together. A student whose tokenizer differs from the teacher's is evaluated on the same held-out
documents and prompts in its own tokenisation; the metrics that need shared token ids (distribution match,
token agreement) are skipped for it with the reason, the others run.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from distill.config import ConfigError, _at_least, _choice, build
from distill.data import DataError
from distill.data.prepare import tokenized_source
from distill.data.shards import dataset_windows
from distill.models import (
    check_model_folder,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
    tokenizer_content,
    tokenizer_difference,
    vocab_size,
)
from distill.report import similarity
from distill.report.metrics import distribution_match, model_log_probs, student_alone
from distill.report.speed import measure, measure_in_fresh_process

DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")
EXPECTED_SPEEDUP = (2.0, 4.0)  # decode speed-up of a distilled student the Llama distillation guide expects


def check(cfg: DictConfig) -> None:
    """The report's own inputs (an EvaluateConfig), before any model or tokenizer is read."""
    if not cfg.students:
        raise ConfigError(
            "students is empty: list the student folders to evaluate, e.g. 'students=[/runs/a/student]'."
        )
    for i, student in enumerate(cfg.students):
        folder = Path(student).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"students[{i}]={student}: no such folder; fix: pass a student's Hugging Face folder (a "
                f"training run's student/, or any save_pretrained folder)."
            )
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"students[{i}]={student} has no config.json: it is not a Hugging Face model folder; fix: "
                f"pass the folder save_pretrained wrote (a training run's student/)."
            )
    check_settings(cfg.report)
    if cfg.teacher.source == "cached":
        raise ConfigError(
            "teacher=cached holds no teacher weights, and the report runs the teacher; pick "
            "teacher=smollm2 or teacher=local teacher.model.name_or_path=/path."
        )
    d = cfg.data
    if d.sources:
        raise ConfigError(
            "data.sources (several sources) is not supported by the report yet; evaluate on one data.source."
        )
    _choice("data.format", d.format, ("auto", "text", "jsonl", "parquet", "megatron"))
    if not 0 < d.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={d.heldout_fraction} must be strictly between 0 and 1.")


def check_settings(r: DictConfig) -> None:
    """The `report` keys (a ReportConfig), shared by launch.evaluate and a training run's report."""
    _at_least("report.sequences", r.sequences, 1)
    _at_least("report.seq_len", r.seq_len, 2)
    if not 1 <= r.buckets <= r.seq_len:
        raise ConfigError(f"report.buckets={r.buckets} must be in [1, report.seq_len={r.seq_len}].")
    _at_least("report.micro_batch", r.micro_batch, 1)
    if not DEVICE.fullmatch(r.device):
        raise ConfigError(
            f"report.device={r.device!r} is not supported; choose auto, cpu, cuda or cuda:<index>."
        )
    s = r.speed
    for key in ("prompt_len", "batch", "repeats"):
        _at_least(f"report.speed.{key}", s[key], 1)
    _at_least("report.speed.new_tokens", s.new_tokens, 2)
    _at_least("report.speed.warmup", s.warmup, 0)
    if s.threads is not None:
        _at_least("report.speed.threads", s.threads, 1)
    g = r.similarity
    if g.enabled:
        for key in ("count", "prompt_tokens", "max_new_tokens", "batch"):
            _at_least(f"report.similarity.{key}", g[key], 1)
        if g.temperature < 0 or not 0 < g.top_p <= 1:
            raise ConfigError(
                f"report.similarity.temperature={g.temperature} must be >= 0 (0: greedy) and top_p="
                f"{g.top_p} in (0, 1]."
            )
        if g.prompts is not None:
            prompts_file(g.prompts)
        if g.judge is not None:
            resolve_model(g.judge)


def prompts_file(path: str) -> list[str]:
    """The prompts of a .jsonl file (a "prompt" field per line) or a .txt file (one per line)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"report.similarity.prompts={path}: no such file; give a .jsonl or .txt of prompts."
        )
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    prompts = [json.loads(line)["prompt"] for line in lines] if file.suffix == ".jsonl" else lines
    if not prompts:
        raise ConfigError(f"report.similarity.prompts={path} holds no prompt; give at least one.")
    return prompts


def resolve_device(name: str) -> torch.device:
    """`report.device`: auto = the current GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"report.device={name}: no CUDA device is visible here; use cpu (or auto).")
    return torch.device(name)


def skip_reason(teacher: Path, student: Path, tokenizers: dict[Path, dict]) -> str | None:
    """Why `student`'s token ids cannot be compared with the teacher's, or None: a tokenizer that turns text
    into other ids (`tokenizers`: folder -> distill.models.tokenizer_content), or another vocabulary size."""
    difference = tokenizer_difference(tokenizers[teacher], tokenizers[student])
    if difference is not None:
        return f"its tokenizer differs from the teacher's ({difference})"
    if vocab_size(student) != vocab_size(teacher):
        return f"its vocabulary has {vocab_size(student)} entries, the teacher's {vocab_size(teacher)}"
    return None


def heldout_rows(cfg: DictConfig, tokenizer_dir: Path, n: int) -> np.ndarray:
    """The first `n` windows of `report.seq_len` tokens of `data`'s held-out split in the tokenizer of
    `tokenizer_dir` (fewer when the split holds fewer): tokenised once into $DISTILL_CACHE/tokenized, as a
    training run tokenises its data, so these are the documents a keyed hash of their text holds out."""
    d = cfg.data
    folder = tokenized_source(d.source, d.format, d.text_field, str(tokenizer_dir), d)
    windows = dataset_windows(folder, "heldout", cfg.report.seq_len)
    if len(windows) == 0:
        raise DataError(
            f"the held-out split of data.source={d.source!r} ({folder}) holds no sequence of "
            f"report.seq_len={cfg.report.seq_len} tokens; raise data.heldout_fraction or lower "
            f"report.seq_len."
        )
    return windows.read(np.arange(min(n, len(windows))))


def machine(device: torch.device) -> dict:
    """The machine the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def evaluate(cfg: DictConfig, command: str) -> dict:
    """Everything metrics.json holds (an EvaluateConfig `cfg`; `command`: how it was started): checks and
    data first, then each model's quality (the teacher first), then every model's speed."""
    check(cfg)
    r = cfg.report
    device = resolve_device(r.device)
    teacher_dir = Path(build(cfg.teacher.model))
    student_dirs = [resolve_model(s) for s in cfg.students]
    judge_dir = resolve_model(r.similarity.judge) if r.similarity.enabled and r.similarity.judge else None
    tokenizers = {}
    for folder in dict.fromkeys([teacher_dir, *student_dirs, *([judge_dir] if judge_dir else [])]):
        check_model_folder(folder)
        tokenizers[folder] = tokenizer_content(folder)
    teacher = {"name": "teacher", "folder": str(teacher_dir)}
    students = [
        {
            "name": f"student {i + 1}",
            "folder": str(f),
            "shared_ids_skipped": skip_reason(teacher_dir, f, tokenizers),
        }
        for i, f in enumerate(student_dirs)
    ]
    g = r.similarity
    rows = heldout_rows(cfg, teacher_dir, max(r.sequences, g.count if g.enabled and not g.prompts else 0))
    teacher_tokenizer = load_tokenizer(teacher_dir)
    prompts, chat = _prompts(g, rows, teacher_tokenizer)
    rows = rows[: r.sequences]
    dtype, attn = cfg.teacher.dtype, cfg.teacher.attn_implementation

    def quality(entry: dict, folder: Path, teacher_model=None, teacher_outputs=None) -> tuple:
        """One model's distribution metrics and outputs into `entry` (the teacher's when teacher_model is
        None); returns (the loaded model, its outputs)."""
        print(f"quality: {entry['name']} {folder}", flush=True)
        model = load_causal_lm(folder, dtype, attn, device).eval()
        tokenizer = load_tokenizer(folder)
        if teacher_model is None:
            entry["quality"] = student_alone(model, rows, r.buckets, r.micro_batch)
        elif entry["shared_ids_skipped"] is None:
            entry["quality"] = distribution_match(
                model, rows, model_log_probs(teacher_model), r.buckets, r.micro_batch
            )
        else:
            own = heldout_rows(cfg, folder, r.sequences)
            entry["sequences_own_tokenization"] = len(own)
            entry["quality"] = student_alone(model, own, r.buckets, r.micro_batch)
        outputs = None
        if g.enabled:
            outputs = similarity.generate(
                model, tokenizer, prompts, g.max_new_tokens, g.temperature, g.top_p, g.seed, g.batch, chat
            )
            if teacher_outputs is not None:
                same = entry["shared_ids_skipped"] is None
                entry["similarity"] = similarity.output_similarity(teacher_outputs, outputs, same)
        return model, outputs

    teacher_model, teacher_outputs = quality(teacher, teacher_dir)
    outputs = {}
    for entry, folder in zip(students, student_dirs):
        model, outputs[entry["name"]] = quality(entry, folder, teacher_model, teacher_outputs)
        del model
    del teacher_model
    if judge_dir is not None:
        print(f"judge: {judge_dir}", flush=True)
        judge = load_causal_lm(judge_dir, dtype, attn, device).eval()
        judge_tokenizer = load_tokenizer(judge_dir)
        teacher_texts = [o["text"] for o in teacher_outputs]
        for entry in students:
            texts = [o["text"] for o in outputs[entry["name"]]]
            entry["similarity"]["judge"] = similarity.judge_agreement(
                judge, judge_tokenizer, prompts, teacher_texts, texts, batch=g.batch
            )
        del judge

    speed = {k: v for k, v in OmegaConf.to_container(r.speed).items() if k != "fresh_process"}
    settings = {"device": str(device), "dtype": dtype, "attn_implementation": attn, **speed}
    for entry in [teacher, *students]:
        print(f"speed: {entry['name']} {entry['folder']}", flush=True)
        if r.speed.fresh_process:
            entry["speed"] = measure_in_fresh_process(entry["folder"], **settings)
        else:
            entry["speed"] = {**measure(entry["folder"], **settings), "process": "this"}
    for entry in students:
        speedup = entry["speed"]["decode_tokens_per_s"] / teacher["speed"]["decode_tokens_per_s"]
        entry["decode_speedup"] = speedup
        entry["reaches_expected_speedup"] = speedup >= EXPECTED_SPEEDUP[0]

    return {
        "command": command,
        "machine": machine(device),
        "settings": {
            "data_source": cfg.data.source,
            "sequences": len(rows),
            "seq_len": r.seq_len,
            "buckets": r.buckets,
            "device": str(device),
            "dtype": str(resolve_dtype(dtype, device)).removeprefix("torch."),
            "attn_implementation": attn,
            "prompts": {"source": g.prompts or "held-out rows", "count": len(prompts), "chat_template": chat},
            "judge": str(judge_dir) if judge_dir else None,
            "judge_template": similarity.JUDGE_TEMPLATE if judge_dir else None,
            "report": OmegaConf.to_container(r),
            "expected_decode_speedup": list(EXPECTED_SPEEDUP),
        },
        "teacher": teacher,
        "students": students,
    }


def _prompts(g: DictConfig, rows: np.ndarray, tokenizer) -> tuple[list[str], bool]:
    """The similarity prompts and whether they go through the chat template: a prompts file's first
    `count` (instructions: yes), or the first `prompt_tokens` tokens of the first `count` held-out rows
    decoded to text (plain continuation: no)."""
    if not g.enabled:
        return [], False
    if g.prompts is not None:
        return prompts_file(g.prompts)[: g.count], True
    return [tokenizer.decode(row[: g.prompt_tokens].tolist()) for row in rows[: g.count]], False


def check_run_report(cfg: DictConfig) -> None:
    """A training run with report.enabled: its settings and a teacher the report can load, checked before
    the run starts (so a run never trains for hours and then fails to report)."""
    if not cfg.report.enabled:
        return
    if cfg.curriculum or cfg.teachers:
        raise ConfigError(
            "report.enabled reports against the run's one teacher; with several teachers or a curriculum, "
            "run `python -m launch.evaluate` after the run with the teacher to compare against."
        )
    if cfg.teacher.source != "live":
        raise ConfigError(
            f"report.enabled with teacher.source={cfg.teacher.source}: the report runs the teacher, and this "
            f"run has no teacher weights; run `python -m launch.evaluate teacher=... "
            f"students=[<run_dir>/student]` with the teacher to compare against, or drop report.enabled."
        )
    check_settings(cfg.report)


def run_report_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The EvaluateConfig of a finished training run's report: the run's teacher, data and logger, its
    exported student, `report` as the run set it, written into <run_dir>/report."""
    from distill.config import EvaluateConfig

    run = OmegaConf.to_container(cfg, resolve=True)
    out = OmegaConf.structured(EvaluateConfig)
    keys = ("teacher", "data", "logger", "report")
    merged = {k: run[k] for k in keys} | {
        "students": [str(Path(run_dir) / "student")],
        "report_dir": str(Path(run_dir) / "report"),
    }
    return OmegaConf.merge(out, merged)


def report_training_run(cfg: DictConfig, run_dir: Path, command: str) -> Path:
    """report.enabled: the report of a finished run's exported student against its teacher, into
    <run_dir>/report, its tables and plots in the run's own W&B run; returns report.md's path."""
    from distill.report.document import write
    from distill.tracking import wandb_run_id

    report_cfg = run_report_config(cfg, run_dir)
    print(f"report: the exported student against the teacher -> {report_cfg.report_dir}", flush=True)
    report = evaluate(report_cfg, command)
    write(report, Path(report_cfg.report_dir), report_cfg.logger, wandb_run_id(Path(run_dir)))
    return Path(report_cfg.report_dir) / "report.md"
