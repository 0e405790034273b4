"""Quality per byte of the teacher's sparse signals: students distilled at equal tokens with each
`stream.sparsifier`, full-vocabulary KD and cross-entropy alone, scored by exact full-vocabulary KL on
held-out text. Prints one JSON object (and writes it to --out).

    python benchmarks/sparse_quality.py                          # 40 steps of 4 x 128 tokens per student
    python benchmarks/sparse_quality.py --steps 97 --seq-len 256 # the issue's setting (~20 min per student)
    python benchmarks/sparse_quality.py --only topk64,sample60

Every student is the same 8-layer cut of the teacher (layers 0-3 and 26-29 of SmolLM2-135M-Instruct),
trained by `python -m launch.train` (our engine, DeepSpeed ZeRO-2 on CPU) with AdamW at a constant
learning rate over the same pydoc windows in the same order; full-vocabulary KD is the same engine with
stream.topk = V. Each exported student is then scored against the fp32 teacher on three held-out sets:
the run's held-out pydoc windows, Python's tutorial and how-to guides (Debian's python3.11-doc:
`apt-get install python3.11-doc`; the set is left out, and said so, when it is not installed) and the
GPL/Apache/MPL licence texts (/usr/share/common-licenses). None of them is trained on.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _train import run_train  # benchmarks/_train.py (scripts run with their folder on sys.path)

VOCAB = 49152
KEEP = [0, 1, 2, 3, 26, 27, 28, 29]
CONFIGS = {  # name: (overrides, bytes per token on the stream)
    "topk64": (["stream.topk=64"], 64 * 4),
    "sample60": (["stream.sparsifier=sample", "stream.samples=60"], 60 * 4 + 4),
    "topk48+sample12": (["stream.sparsifier=topk_sample", "stream.topk=48", "stream.samples=12"], 60 * 4 + 4),
    "topk32+sample28": (["stream.sparsifier=topk_sample", "stream.topk=32", "stream.samples=28"], 60 * 4 + 4),
    "full vocabulary": ([f"stream.topk={VOCAB}", "stream.values_dtype=float32"], VOCAB * 6),
    "cross-entropy only": (["teacher=none"], 0),
}
TUTORIAL = Path("/usr/share/doc/python3.11/html")
LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-3", "GFDL-1.3"]


def train(name: str, overrides: list[str], args, work: Path) -> Path:
    """One student through the CLI; returns its run directory."""
    run_dir = work / re.sub(r"[^a-z0-9]+", "-", name.lower())
    settings = [
        "student=smollm2_pruned",
        f"student.model.keep_layers=[{','.join(map(str, KEEP))}]",
        "data=pydoc",
        f"data.seq_len={args.seq_len}",
        "data.heldout_sequences=8",
        f"trainer.micro_batch_size={args.micro_batch}",
        "trainer.num_ranks=1",
        "trainer.grad_accum_steps=1",
        f"trainer.max_steps={args.steps}",
        f"trainer.lr={args.lr}",
        "trainer.min_lr_ratio=1.0",
        "trainer.warmup_steps=0",
        "trainer.eval_every=100000",
        "trainer.checkpoint_every=100000",
        "logger=none",
        *overrides,
        f"run_dir={run_dir}",
    ]
    print(f"{name}: trained in {run_train(settings):.0f} s", file=sys.stderr)
    return run_dir


def windows(texts: list[str], tokenizer, seq_len: int, count: int) -> np.ndarray:
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    usable = len(ids) // seq_len
    picks = np.linspace(0, usable - 1, min(count, usable)).astype(int)  # spread over the whole set
    return np.stack([ids[i * seq_len : (i + 1) * seq_len] for i in picks])


def html_text(path: Path) -> str:
    body = re.sub(r"(?s)<(script|style).*?</\1>", " ", path.read_text(errors="ignore"))
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))).strip()


def heldout_sets(pydoc: np.ndarray, tokenizer, seq_len: int, count: int) -> tuple[dict, dict]:
    sets, missing = {"pydoc (held out)": pydoc[:count]}, {}
    pages = sorted([*TUTORIAL.glob("tutorial/*.html"), *TUTORIAL.glob("howto/*.html")])
    if pages:
        sets["python tutorial + howto"] = windows([html_text(p) for p in pages], tokenizer, seq_len, count)
    else:
        missing["python tutorial + howto"] = f"{TUTORIAL} not found: apt-get install python3.11-doc"
    texts = [(Path("/usr/share/common-licenses") / n).read_text() for n in LICENSES]
    sets["licences (GPL, Apache, MPL, LGPL, GFDL)"] = windows(texts, tokenizer, seq_len, count)
    return sets, missing


@torch.no_grad()
def score(model, teacher_log_probs: list[torch.Tensor], sequences: np.ndarray) -> dict:
    """Exact KL(teacher || student) per predicted token, top-1 agreement, student perplexity."""
    kl = top1 = nll = 0.0
    count = 0
    for row, log_p in zip(sequences, teacher_log_probs):
        ids = torch.from_numpy(row.astype(np.int64))[None]
        log_q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1].double()
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        top1 += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        nll -= log_q.gather(-1, ids[0, 1:, None]).sum().item()
        count += len(log_p)
    return {"kl": kl / count, "top1": top1 / count, "ppl": math.exp(nll / count)}


def main(args) -> dict:
    from distill.models import load_causal_lm, load_tokenizer, smollm2_folder, student_from_teacher

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="sparse-quality-"))
    chosen = args.only.split(",") if args.only else list(CONFIGS)
    runs = {name: train(name, CONFIGS[name][0], args, work) for name in chosen}
    teacher_dir = smollm2_folder()
    tokenizer = load_tokenizer(teacher_dir)
    pydoc = np.load(next(iter(runs.values())) / "data" / "heldout.npy")
    sets, missing = heldout_sets(pydoc, tokenizer, args.seq_len, args.eval_sequences)
    teacher = load_causal_lm(teacher_dir, dtype="float32").eval()
    references, teacher_scores = {}, {}
    for name, sequences in sets.items():
        references[name] = [
            torch.log_softmax(
                teacher(input_ids=torch.from_numpy(r.astype(np.int64))[None]).logits[0, :-1], -1
            ).double()
            for r in sequences
        ]
        teacher_scores[name] = score(teacher, references[name], sequences)["ppl"]
    del teacher
    students = {"initial (no training)": student_from_teacher(teacher_dir, KEEP)}
    students.update({name: run / "student" for name, run in runs.items()})
    table = []
    for name, folder in students.items():
        model = load_causal_lm(folder, dtype="float32").eval()
        row = {"student": name, "stream_bytes_per_token": CONFIGS.get(name, (None, None))[1]}
        for set_name, sequences in sets.items():
            row[set_name] = score(model, references[set_name], sequences)
        table.append(row)
        del model
    return {
        "benchmark": "sparse_quality",
        "teacher": "SmolLM2-135M-Instruct (fp32)",
        "student": f"layers {KEEP} of the teacher",
        "training": f"{args.steps} steps x {args.micro_batch} x {args.seq_len} pydoc tokens, lr {args.lr}",
        "teacher_ppl": teacher_scores,
        "heldout_sequences": {k: len(v) for k, v in sets.items()},
        "left_out": missing,
        "results": table,
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "command": "python benchmarks/sparse_quality.py " + " ".join(sys.argv[1:]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-sequences", type=int, default=8)
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = main(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
