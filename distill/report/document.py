"""The report's files from `distill.report.report.evaluate`'s result: metrics.json, report.md with its
tables, two plots (quality against parameters and against decode speed), and the same tables and plots in
W&B when a logger is configured."""

from __future__ import annotations

import json
import os
from pathlib import Path

PLOTS = ("quality_vs_size.png", "quality_vs_speed.png")


def _f(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or a dash when there is none."""
    return "—" if value is None else format(value, spec)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def tables(report: dict) -> dict[str, tuple[list[str], list[list]]]:
    """The report's tables by name: (header, rows), teacher first where it has a row."""
    teacher, students = report["teacher"], report["students"]
    s = report["settings"]
    low, high = s["expected_decode_speedup"]
    models = [teacher, *students]
    out = {}

    def matched(e: dict) -> bool:
        return e is not teacher and e["shared_ids_skipped"] is None

    def speedup(e: dict) -> str:
        if e is teacher:
            return "1.00x"
        x = e["decode_speedup"]
        return f"{x:.2f}x " + (
            f"(at least the guide's {low:g}x)" if x >= low else f"(below the guide's {low:g}x)"
        )

    out["summary"] = (
        ["model", "parameters", "KL", "top-1", "ppl", "decode tok/s", "decode speed-up"],
        [
            [
                e["name"],
                f"{e['speed']['parameters']:,}",
                _f(e["quality"].get("kl"), ".4f") if matched(e) else "—",
                _f(e["quality"].get("top1_agreement"), ".1%") if matched(e) else "—",
                _f(e["quality"]["ppl"], ".3f") + ("" if e is teacher or matched(e) else " *"),
                f"{e['speed']['decode_tokens_per_s']:.1f}",
                speedup(e),
            ]
            for e in models
        ],
    )  # fmt: skip
    if s["prompts"]["count"]:
        judged = s["judge"] is not None
        out["similarity"] = (
            ["model", "exact match", "token agreement", "BLEU", "ROUGE-L", *(["judge"] if judged else [])],
            [
                [
                    e["name"],
                    _f(e["similarity"]["exact_match"], ".1%"),
                    _f(e["similarity"]["token_agreement"], ".1%"),
                    _f(e["similarity"]["bleu"], ".2f"),
                    _f(e["similarity"]["rouge_l"], ".4f"),
                    *([_f(e["similarity"]["judge"]["mean_score"], ".3f")] if judged else []),
                ]
                for e in students
            ],
        )
    out["distribution"] = (
        ["model", "KL", "reverse KL", "JS", "top-1", "top-5", "ppl", "ECE"],
        [
            [
                e["name"],
                *(
                    [_f(e["quality"][k], f) for k, f in (("kl", ".4f"), ("reverse_kl", ".4f"), ("js", ".4f"))]
                    + [_f(e["quality"][k], ".1%") for k in ("top1_agreement", "top5_agreement")]
                    if matched(e)
                    else ["—" if e is teacher else "skipped"] * 5
                ),
                _f(e["quality"]["ppl"], ".3f") + ("" if e is teacher or matched(e) else " *"),
                _f(e["quality"]["ece"], ".4f"),
            ]
            for e in models
        ],
    )
    out["speed"] = (
        ["model", "parameters", "disk MiB", "peak MiB", "prefill tok/s", "decode tok/s", "TTFT ms",
         "decode speed-up"],
        [
            [
                e["name"],
                f"{e['speed']['parameters']:,}",
                f"{e['speed']['disk_bytes'] / 2**20:.2f}",
                f"{e['speed']['peak_memory_bytes'] / 2**20:.1f}",
                f"{e['speed']['prefill_tokens_per_s']:.1f}",
                f"{e['speed']['decode_tokens_per_s']:.1f}",
                f"{e['speed']['time_to_first_token_s'] * 1000:.1f}",
                speedup(e),
            ]
            for e in models
        ],
    )  # fmt: skip
    buckets = [e for e in students if matched(e)]
    if buckets:
        spans = [
            f"positions {b['first_position']}-{b['last_position']}" for b in buckets[0]["quality"]["buckets"]
        ]
        out["kl_by_position"] = (
            ["model", *spans],
            [[e["name"], *(_f(b["kl"], ".4f") for b in e["quality"]["buckets"])] for e in buckets],
        )
    return out


def render(report: dict) -> str:
    """report.md: what was evaluated where, the five sections' tables, the plots and what each number is."""
    teacher, students, s, m = report["teacher"], report["students"], report["settings"], report["machine"]
    low, high = s["expected_decode_speedup"]
    t = tables(report)
    where = (
        f"{m['cpu']} ({m['cpu_count']} CPUs), {m['gpu']}"
        if m["gpu"]
        else f"{m['cpu']} ({m['cpu_count']} CPUs)"
    )
    lines = [
        "# Students against their teacher",
        "",
        f"Held-out text: {s['sequences']} sequences of {s['seq_len']} tokens from the held-out split of "
        f"`{s['data_source']}`. Models on {s['device']} in {s['dtype']}; {where}; torch {m['torch']}, "
        f"transformers {m['transformers']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "## At a glance",
        "",
        *_table(*t["summary"]),
        "",
        *(f"- {e['name']}: `{e['folder']}`" for e in [teacher, *students]),
    ]
    if "similarity" in t:
        p = s["prompts"]
        lines += [
            "",
            "## 1. Output similarity",
            "",
            f"{p['count']} prompts ({p['source']}; chat template: {'yes' if p['chat_template'] else 'no'}); "
            f"both models decode alike ({_decoding(s['report']['similarity'])}); the teacher's outputs are "
            f"the reference.",
            "",
            *_table(*t["similarity"]),
        ]
        if s["judge"]:
            lines += ["", f"Judge: `{s['judge']}`, P(Yes) / (P(Yes) + P(No)) after this prompt:", "", "```",
                      s["judge_template"], "```"]  # fmt: skip
        for e in students:
            for ex in e["similarity"]["examples"][:1]:
                lines += [
                    "",
                    f"{e['name']}, first prompt: `{_short(ex['prompt'])}`",
                    f"- teacher: `{_short(ex['teacher'])}`",
                    f"- student: `{_short(ex['student'])}`",
                ]
    lines += ["", "## 2. Distribution match", "", *_table(*t["distribution"])]
    if "kl_by_position" in t:
        lines += ["", "KL(teacher‖student) per position bucket:", "", *_table(*t["kl_by_position"])]
    lines += ["", "## 3. Practical benefits", "", *_table(*t["speed"])]
    lines += ["", "## 4. Sizes", "", *(f"![{p}]({p})" for p in PLOTS)]
    lines += ["", "## Notes", ""]
    for e in students:
        if e["shared_ids_skipped"] is not None:
            lines.append(
                f"- {e['name']}: distribution metrics and token agreement skipped: "
                f"{e['shared_ids_skipped']}. Its ppl (*) and ECE are on the same held-out documents in its "
                f"own tokenisation: per token of another tokenizer, not comparable with the teacher's."
            )
    v = teacher["speed"]
    run = v["settings"]
    process = "each model in a fresh process" if v["process"] == "fresh" else "every model in this process"
    lines += [
        "- KL = KL(teacher‖student), reverse KL = KL(student‖teacher), JS = Jensen-Shannon divergence "
        "(natural log), averaged over every position; top-1: the student's most likely token is the "
        "teacher's; top-5: the teacher's most likely token is among the student's 5 most likely; ppl and ECE "
        "(15 equal-width confidence bins) of the next token. Definitions: distill/report/metrics.py.",
        "- Output similarity: exact match of the stripped texts; token agreement: the teacher's generated "
        "positions where the student generated the same token; BLEU (sacrebleu) and ROUGE-L F (rouge-score) "
        "with the teacher's outputs as references. Definitions: distill/report/similarity.py.",
        f"- Speed and memory measured on this machine under its load at the time ({v['threads']} torch "
        f"threads, {process}): prefill = {run['batch']} x {run['prompt_len']} prompt tokens through one "
        f"forward; decode and time to first token (TTFT) = greedy generation of {run['new_tokens']} tokens "
        f"with a KV cache; medians of {run['repeats']} runs after {run['warmup']} warm-up. Peak memory: "
        f"{v['memory_method']}. Definitions: distill/report/speed.py.",
        f"- Decode speed-up = the student's decode tokens/s / the teacher's; the Llama distillation guide "
        f"expects {low:g}-{high:g}x of a distilled student.",
    ]
    return "\n".join(lines) + "\n"


def _decoding(g: dict) -> str:
    sampling = (
        "greedy"
        if g["temperature"] == 0
        else f"T {g['temperature']:g}, top-p {g['top_p']:g}, seed {g['seed']}"
    )
    return f"{sampling}, up to {g['max_new_tokens']} new tokens"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= n else text[: n - 1] + "…"


def plot(report: dict, out_dir: Path) -> list[Path]:
    """Two PNGs: held-out KL to the teacher and held-out perplexity, against parameters
    (quality_vs_size.png) and against decode tokens/s (quality_vs_speed.png), one point per model (the
    teacher at KL 0; a student without the teacher's token ids has neither point: its numbers are per token
    of another tokenizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [report["teacher"], *report["students"]]
    paths = []
    for name, (key, label) in zip(
        PLOTS, [("parameters", "parameters"), ("decode_tokens_per_s", "decode tokens/s (this machine)")]
    ):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for e in models:
            x = e["speed"][key]
            is_teacher = e is report["teacher"]
            if not is_teacher and e["shared_ids_skipped"] is not None:
                continue
            kl = 0.0 if is_teacher else e["quality"]["kl"]
            style = {"marker": "*" if is_teacher else "o", "s": 140 if is_teacher else 60}
            for ax, y in zip(axes, (kl, e["quality"]["ppl"])):
                if y is not None:
                    ax.scatter([x], [y], **style)
                    ax.annotate(e["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        axes[0].set_ylabel("held-out KL(teacher‖student), nats/token")
        axes[1].set_ylabel("held-out perplexity")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"students against their teacher: quality vs {label}")
        fig.tight_layout()
        path = Path(out_dir) / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write(report: dict, report_dir: Path, logger_cfg=None, wandb_id: str | None = None) -> str:
    """metrics.json, report.md and the plots into `report_dir` (each file written whole, then renamed), and
    with a W&B logger the tables (wandb.Table) and plots to W&B (`wandb_id`: resume that run, e.g. the
    training run's, instead of starting one). Returns report.md's text."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = plot(report, report_dir)
    text = render(report)
    for name, content in (("metrics.json", json.dumps(report, indent=1) + "\n"), ("report.md", text)):
        tmp = report_dir / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(report_dir / name)
    if logger_cfg is not None and logger_cfg.backend == "wandb" and logger_cfg.mode != "disabled":
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=logger_cfg.project,
            group=logger_cfg.group,
            name=logger_cfg.name or f"report-{report_dir.name}",
            mode=logger_cfg.mode,
            dir=str(report_dir),
            id=wandb_id,
            resume="allow" if wandb_id else None,
            config={"report": report["settings"], "command": report["command"]},
        )
        run.log(
            {
                f"report/{name}": wandb.Table(columns=header, data=rows)
                for name, (header, rows) in tables(report).items()
            }
            | {f"report/{p.stem}": wandb.Image(str(p)) for p in paths}
        )
        run.finish()
    return text
