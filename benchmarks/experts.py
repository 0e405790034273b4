"""Multi-teacher mixture vs sequential expert specialisation, at equal tokens and equal compute.

    python -m benchmarks.experts                      # 3 seeds; writes docs/experts.md, prints JSON
    python -m benchmarks.experts --seeds 0 1 --steps 60 --work /tmp/experts

1. Two specialist teachers, made here with the same engine and no teacher (`teacher=none`, plain
   cross-entropy): one on Python's documentation (`pydoc_topics`), one on Debian's license texts
   (`common_licenses`), from the same small Llama and a tokenizer trained on both corpora.
2. A smaller student (one initial folder per seed) distilled three ways, each for `--steps` optimizer
   steps of the same batch (so the same student tokens, and the same teacher tokens: every row is scored
   by exactly one teacher):
   mixture  conf/experiment/experts_mixture.yaml: both sources 50/50 in every batch, each to its expert;
   A->B     conf/experiment/experts_sequential.yaml: half the steps on python with its expert, then half
            on licenses with its expert, continuing from the first phase's checkpoint (optimizer kept);
   B->A     the same, licenses first.
3. Every student is evaluated on each domain's held-out set: exact KL(expert || student) over the full
   vocabulary to EACH expert, and perplexity; for the sequential recipes also after the first phase
   (what the second phase made it forget). Mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("python", "licenses")
CORPORA = {"python": "pydoc_topics", "licenses": "common_licenses"}


TRAINED = []  # runs trained by this invocation (none: only re-evaluated, timings come from timings.json)


def train_cli(overrides: list[str], env: dict) -> None:
    """One `python -m launch.train` run; its output goes to <run_dir>/train.log."""
    TRAINED.append(overrides)
    run_dir = Path(next(o for o in overrides if o.startswith("run_dir="))[8:])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "launch.train", *overrides], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {run_dir / 'train.log'}")


def make_experts(work: Path, steps: int, env: dict) -> None:
    """The tokenizer, both specialist teachers (plain cross-entropy on their corpus) and student inits."""
    from distill.data import load_documents
    from distill.models import tiny_llama, tiny_tokenizer

    if (work / "python").is_dir() and (work / "licenses").is_dir():
        return
    corpus = [d for name in DOMAINS for d in load_documents(CORPORA[name])]
    tokenizer = tiny_tokenizer(work / "tokenizer", vocab_size=512, corpus=corpus)
    for i, name in enumerate(DOMAINS):
        init = tiny_llama(
            work / f"expert-init-{name}",
            vocab_size=512,
            hidden_size=128,
            num_layers=4,
            intermediate_size=256,
            seed=10 + i,
            tokenizer_dir=tokenizer,
            max_position_embeddings=256,
        )
        run_dir = work / f"train-{name}"
        train_cli(
            [
                "teacher=none",
                "student=local",
                f"student.model.name_or_path={init}",
                f"data.source={CORPORA[name]}",
                "data.seq_len=128",
                "data.heldout_sequences=16",
                "logger=none",
                "trainer.num_ranks=1",
                "trainer.micro_batch_size=8",
                f"trainer.max_steps={steps}",
                "trainer.warmup_steps=10",
                "trainer.lr=3e-3",
                "trainer.eval_every=100000",
                "trainer.checkpoint_every=100000",
                "trainer.log_every=50",
                "ray.num_cpus=2",
                f"run_dir={run_dir}",
            ],
            env,
        )
        (run_dir / "student").rename(work / name)


def student_init(work: Path, seed: int) -> Path:
    from distill.models import tiny_llama

    folder = work / f"student-init-{seed}"
    if not folder.is_dir():
        tiny_llama(
            folder,
            vocab_size=512,
            hidden_size=64,
            num_layers=2,
            intermediate_size=128,
            seed=100 + seed,
            tokenizer_dir=work / "tokenizer",
            max_position_embeddings=256,
        )
    return folder


RECIPES = {
    "mixture": ["+experiment=experts_mixture"],
    "A->B": ["+experiment=experts_sequential"],
    "B->A": [
        "+experiment=experts_sequential",
        "curriculum.0.sources=[licenses]",
        "curriculum.1.sources=[python]",
    ],
}


def run_recipe(work: Path, recipe: str, seed: int, steps: int, env: dict) -> Path:
    run_dir = work / "runs" / f"{recipe.replace('->', '-')}-seed{seed}"
    if (run_dir / "summary.json").is_file() or (run_dir / "curriculum.json").is_file():
        state = run_dir / "curriculum.json"
        if not state.is_file() or all(p["status"] == "done" for p in json.loads(state.read_text())["phases"]):
            return run_dir
    overrides = [
        *RECIPES[recipe],
        f"student.model.name_or_path={student_init(work, seed)}",
        f"trainer.seed={seed}",
        f"trainer.max_steps={steps}",
        f"run_dir={run_dir}",
        "trainer.resume=auto",
    ]
    if recipe != "mixture":
        overrides += [f"curriculum.0.max_steps={steps // 2}", f"curriculum.1.max_steps={steps - steps // 2}"]
    train_cli(overrides, env)
    return run_dir


@torch.no_grad()
def domain_metrics(student_dir: Path, experts: dict, heldout: dict) -> dict:
    """Per domain: exact KL(expert || student) to each expert (full vocabulary, float64) and perplexity."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    out = {}
    for domain, tokens in heldout.items():
        ids = torch.from_numpy(tokens.astype(np.int64))
        log_q = torch.log_softmax(student(input_ids=ids).logits.double(), -1)
        nll = -log_q[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).mean().item()
        out[f"{domain}/ppl"] = math.exp(nll)
        for name, expert in experts.items():
            log_p = torch.log_softmax(expert(input_ids=ids).logits.double(), -1)
            out[f"{domain}/kl_{name}"] = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return out


def heldout_sets(run_dir: Path) -> dict:
    data = run_dir / "data" if (run_dir / "data").is_dir() else next(run_dir.glob("phase-0-*")) / "data"
    tokens = np.load(data / "heldout.npy", allow_pickle=False)
    source = np.load(data / "heldout_source.npy", allow_pickle=False)
    return {name: tokens[source == i] for i, name in enumerate(DOMAINS)}


def final_students(run_dir: Path) -> dict[str, Path]:
    """The exported students: the final one, and for a curriculum also the one after its first phase."""
    if (run_dir / "student").is_dir():
        return {"final": run_dir / "student"}
    phases = sorted(run_dir.glob("phase-*"), key=lambda p: int(p.name.split("-")[1]))
    return {"after phase 1": phases[0] / "student", "final": phases[-1] / "student"}


def table(results: dict, experts: dict, seeds: list[int]) -> str:
    cols = [f"{d}/kl_{e}" for d in DOMAINS for e in DOMAINS] + [f"{d}/ppl" for d in DOMAINS]
    heads = [f"{d} KL to {e} expert" for d in DOMAINS for e in DOMAINS] + [f"{d} ppl" for d in DOMAINS]
    lines = ["| recipe | student | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(cols)]
    rows = [("experts", name, [m]) for name, m in experts.items()]
    for (recipe, when), per_seed in results.items():
        rows.append((recipe, when, per_seed))
    for recipe, when, per_seed in rows:
        cells = []
        for c in cols:
            values = np.array([m[c] for m in per_seed if c in m])
            if len(values) == 0:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}")
        lines.append(f"| {recipe} | {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def in_domain(results: dict) -> str:
    """Each domain against its own expert (the routing target), the average, and mean perplexity."""
    lines = [
        "| recipe | student | python: KL to its expert | licenses: KL to its expert | mean | mean ppl |",
        "|---|---|---|---|---|---|",
    ]
    for (recipe, when), per_seed in results.items():
        own = np.array([[m["python/kl_python"], m["licenses/kl_licenses"]] for m in per_seed])
        ppl = np.array([[m["python/ppl"], m["licenses/ppl"]] for m in per_seed]).mean(1)
        mean = own.mean(1)
        cells = [
            f"{own[:, 0].mean():.3f}",
            f"{own[:, 1].mean():.3f}",
            f"{mean.mean():.3f} ± {mean.std(ddof=1):.3f}",
        ]
        lines.append(f"| {recipe} | {when} | " + " | ".join(cells) + f" | {ppl.mean():.1f} |")
    return "\n".join(lines)


def findings(results: dict) -> str:
    """What the numbers say, computed from them (so a rerun rewrites it)."""

    def mean_own(recipe: str, when: str = "final") -> float:
        return float(
            np.mean([(m["python/kl_python"] + m["licenses/kl_licenses"]) / 2 for m in results[recipe, when]])
        )

    def own(recipe: str, domain: str, when: str = "final") -> float:
        return float(np.mean([m[f"{domain}/kl_{domain}"] for m in results[recipe, when]]))

    best = min(RECIPES, key=mean_own)
    text = [
        f"**What we measured.** Averaged over both domains, each against its own expert, the lowest final KL "
        f"is **{best}** ({', '.join(f'{r} {mean_own(r):.3f}' for r in RECIPES)} nats/token)."
    ]
    for recipe, (first, last) in (("A->B", ("python", "licenses")), ("B->A", ("licenses", "python"))):
        last_kl, mix_last = own(recipe, last), own("mixture", last)
        first_kl, mix_first = own(recipe, first), own("mixture", first)
        text.append(
            f"{recipe}: on its last domain ({last}) KL {last_kl:.3f}, "
            f"{'below' if last_kl < mix_last else 'above'} the mixture's {mix_last:.3f}; on its first domain "
            f"({first}) KL went from {own(recipe, first, 'after phase 1'):.3f} after phase 1 to "
            f"{first_kl:.3f} at the end (forgetting), against the mixture's {mix_first:.3f}."
        )
    return " ".join(text)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120, help="student optimizer steps per recipe")
    parser.add_argument("--expert-steps", type=int, default=400)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "experts")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "experts.md")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "DISTILL_EXPERTS": str(work)}
    start = time.perf_counter()
    make_experts(work, args.expert_steps, env)
    expert_s = time.perf_counter() - start

    from transformers import AutoModelForCausalLM

    experts = {n: AutoModelForCausalLM.from_pretrained(work / n, dtype=torch.float32).eval() for n in DOMAINS}
    results: dict[tuple[str, str], list[dict]] = {}
    expert_rows: dict[str, dict] = {}
    for seed in args.seeds:
        for recipe in RECIPES:
            run_dir = run_recipe(work, recipe, seed, args.steps, env)
            heldout = heldout_sets(run_dir)
            if not expert_rows:
                for name in DOMAINS:
                    expert_rows[f"{name} expert"] = domain_metrics(work / name, experts, heldout)
            for when, student in final_students(run_dir).items():
                results.setdefault((recipe, when), []).append(domain_metrics(student, experts, heldout))
    timing = {"expert_training_s": round(expert_s, 1), "wall_s": round(time.perf_counter() - start, 1)}
    if TRAINED:
        (work / "timings.json").write_text(json.dumps(timing))
    elif (work / "timings.json").is_file():  # everything was trained before: report that run's times
        timing = json.loads((work / "timings.json").read_text())
    command = "python -m benchmarks.experts " + " ".join(
        [
            f"--seeds {' '.join(map(str, args.seeds))}",
            f"--steps {args.steps}",
            f"--expert-steps {args.expert_steps}",
        ]
    )
    report = {
        "command": command,
        "seeds": args.seeds,
        "student_steps": args.steps,
        "tokens_per_recipe": args.steps * 8 * 128,
        **timing,
        "experts": expert_rows,
        "results": {f"{r} ({w})": v for (r, w), v in results.items()},
    }
    md = table(results, expert_rows, args.seeds) + "\n\n" + in_domain(results) + "\n\n" + findings(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_doc(md, report))
    print(json.dumps(report, indent=1))
    return report


def render_doc(md: str, report: dict) -> str:
    return f"""# Several teachers: mixture vs sequential expert specialisation

Generated by `{report["command"]}` (wall {report["wall_s"] / 60:.1f} min on this project's 2-core CPU,
shared; experts trained in {report["expert_training_s"] / 60:.1f} min). Every number is measured by that
command; rerun it to reproduce (`--work` keeps the models and runs).

**Setup.** Two specialist teachers made here with plain cross-entropy (`teacher=none`): a 4-layer,
128-wide Llama (vocabulary 512, a BPE trained on both corpora) on Python's documentation (`python`) and one on
Debian's license texts (`licenses`). The student is a 2-layer, 64-wide Llama, one initial folder per seed.
Each recipe trains {report["student_steps"]} optimizer steps of 8 sequences x 128 tokens
({report["tokens_per_recipe"]:,} student tokens; every token is scored by exactly one teacher, so the teacher
compute is equal too), top-32 forward KL with the tail bucket:

- **mixture** (`+experiment=experts_mixture`, Meta's multi-teacher recipe): both domains 50/50 in every
  batch, each row distilled from its domain's expert;
- **A->B** (`+experiment=experts_sequential`): half the steps on python with the python expert, then half on
  licenses with the licenses expert, from the first phase's checkpoint (optimizer state kept);
- **B->A**: the same, licenses first.

Held-out sets: 16 sequences per domain (documents never trained on). KL is the exact KL(expert ‖ student)
over the full vocabulary, in nats per token; mean ± sample standard deviation over seeds
{", ".join(map(str, report["seeds"]))}. The `after phase 1` rows show the sequential students before their
second phase (the forgetting shows up as the rise from there to `final` on the first domain).

{md}

Lower is better everywhere. The "experts" rows are the teachers themselves (their KL to themselves is 0).
Scale caveat: experts of 0.72M parameters, a 0.14M-parameter student, {report["student_steps"]} steps, two
domains; the comparison says what these runs measured, not what holds for LLMs.
"""


if __name__ == "__main__":
    main()
