"""Peak memory and time of one forward+backward: fused chunked KD loss vs the plain PyTorch version.

Each forward+backward runs in a fresh subprocess, so no variant sees another's allocator state, and the
variants are interleaved round by round so that load from other work on the machine hits them alike.
Memory is the growth of the process's peak resident set during one forward+backward: Linux VmHWM (reset
through /proc/self/clear_refs just before) minus VmRSS just before. Inputs (hidden states, lm_head weight,
the teacher's top-k) exist before and are excluded; the lm_head weight gradient (V x H fp32), which both
variants must produce, is included and also reported separately. CPU only; large blocks go back to the OS
when freed, so RSS tracks live tensors.

Prints ONE JSON object on stdout. Reproduce: python benchmarks/loss_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "unfused", "fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="tokens per fused chunk (the library default is 1024)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds; each runs every variant once, in its own fresh process",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument(
        "--variants",
        default="plain,fused",
        help=f"comma list from {', '.join(VARIANTS)} (unfused = DistillationLoss.__call__ on full logits)",
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- child: one variant


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5 = reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def run_child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from distill.losses import DistillationLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, width, vocab, k = args.tokens, args.hidden, args.vocab, args.k
    hidden = (torch.randn(n, width, generator=gen) * 0.5).requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=gen) * width**-0.5).requires_grad_(True)
    # Teacher top-k: distinct ids per token (top-k of random scores, 256 rows at a time to stay small),
    # log-probs normalised over the full vocabulary holding 90% of the mass, sorted like torch.topk.
    indices = torch.cat(
        [torch.rand(256, vocab, generator=gen)[: n - s].topk(k).indices for s in range(0, n, 256)]
    )
    values = (torch.randn(n, k, generator=gen) * 2).log_softmax(-1).sort(-1, descending=True).values - 0.10536
    values = values.half()  # the wire format
    labels = torch.randint(0, vocab, (n,), generator=gen)
    normaliser = float(n)
    loss_fn = DistillationLoss("forward_kl", chunk_size=args.chunk_size)

    def plain(rows: slice) -> torch.Tensor:
        """What one writes without the library: full logits, log_softmax, bucket forward KL over top-k."""
        logits = hidden[rows] @ weight.T
        logq = logits.float().log_softmax(-1)
        logq_k = logq.gather(-1, indices[rows])
        logp_k = values[rows].float()
        tail_q = torch.log(-torch.expm1(logq_k.logsumexp(-1).clamp(max=-1e-7)))
        tail_p = torch.log(-torch.expm1(logp_k.logsumexp(-1).clamp(max=-1e-7)))
        kl = (logp_k.exp() * (logp_k - logq_k)).sum(-1) + tail_p.exp() * (tail_p - tail_q)
        return kl.sum() / normaliser

    def unfused(rows: slice) -> torch.Tensor:
        args = (values[rows], indices[rows], labels[rows], None, normaliser)
        return loss_fn(hidden[rows] @ weight.T, *args).loss

    def fused(rows: slice) -> torch.Tensor:
        return loss_fn.fused(
            hidden[rows], weight, values[rows], indices[rows], labels[rows], None, normaliser
        ).loss

    step = {"plain": plain, "unfused": unfused, "fused": fused}[args.child]
    step(slice(0, 4)).backward()  # warm-up on 4 tokens: one-off lazy initialisation stays out of the timing
    hidden.grad = weight.grad = None
    reset_ok = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss = step(slice(None))
    loss.backward()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) * 1024
    return {
        "peak_bytes": peak,
        "weight_grad_bytes": weight.grad.numel() * weight.grad.element_size(),
        "peak_reset_supported": reset_ok,
        "time_s": seconds,
        "loss": loss.item(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- parent: compare variants


def summarise(runs: list[dict]) -> dict:
    times = [r["time_s"] for r in runs]
    peak = max(r["peak_bytes"] for r in runs)
    return {
        **runs[0],
        "peak_bytes": peak,
        "peak_bytes_excluding_weight_grad": peak - runs[0]["weight_grad_bytes"],
        "peak_reset_supported": all(r["peak_reset_supported"] for r in runs),
        "time_s_each_run": [round(t, 3) for t in times],
        "time_s_min": round(min(times), 3),
        "time_s_median": round(statistics.median(times), 3),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "plain" not in variants or "fused" not in variants:
        raise SystemExit(f"--variants must include plain and fused, from {VARIANTS}; got {args.variants!r}")
    knobs = ["--vocab", args.vocab, "--hidden", args.hidden, "--tokens", args.tokens, "--k", args.k]
    knobs += ["--chunk-size", args.chunk_size, "--threads", args.threads]
    knobs = [str(x) for x in knobs]
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(max(1, args.repeats)):  # interleaved, so background load hits every variant alike
        for variant in variants:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", variant, *knobs],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"variant {variant} failed:\n{proc.stderr}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {variant: summarise(variant_runs) for variant, variant_runs in runs.items()}
    plain, fused = results["plain"], results["fused"]
    mib = 1024 * 1024
    reduction = 1 - fused["peak_bytes"] / plain["peak_bytes"]
    reduction_ex = 1 - fused["peak_bytes_excluding_weight_grad"] / plain["peak_bytes_excluding_weight_grad"]
    speedup = plain["time_s_median"] / fused["time_s_median"]
    speedup_min = plain["time_s_min"] / fused["time_s_min"]
    report = {
        "command": "python benchmarks/loss_memory.py",
        "argv": " ".join(
            ["python", "benchmarks/loss_memory.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "config": {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "tokens": args.tokens,
            "k": args.k,
            "chunk_size": args.chunk_size,
            "dtype": "float32 hidden/weight, float16 teacher values",
            "divergence": "forward_kl, bucket tail, T=1",
            "repeats": args.repeats,
        },
        "memory_measure": (
            "peak RSS growth (Linux VmHWM after, reset via /proc/self/clear_refs, minus VmRSS before) of a "
            "fresh process over one forward+backward; inputs excluded; includes the V x H fp32 lm_head "
            "weight gradient both variants produce (also reported excluded)"
        ),
        "time_measure": (
            "wall-clock seconds of one forward+backward per fresh process, variants interleaved over "
            "repeats; min and median reported (the machine may be shared, min is the least disturbed)"
        ),
        "variants": {
            name: {
                "peak_mib": round(r["peak_bytes"] / mib, 1),
                "peak_mib_excluding_weight_grad": round(r["peak_bytes_excluding_weight_grad"] / mib, 1),
                "time_s_min": r["time_s_min"],
                "time_s_median": r["time_s_median"],
                "time_s_each_run": r["time_s_each_run"],
                "loss": r["loss"],
            }
            for name, r in results.items()
        },
        "weight_grad_mib": round(plain["weight_grad_bytes"] / mib, 1),
        "peak_memory_reduction": round(reduction, 3),
        "peak_memory_reduction_excluding_weight_grad": round(reduction_ex, 3),
        "speedup_plain_over_fused_median": round(speedup, 3),
        "speedup_plain_over_fused_min": round(speedup_min, 3),
        "loss_abs_diff_plain_vs_fused": abs(plain["loss"] - fused["loss"]),
        "targets": {
            "memory_reduction_at_least_80pct": reduction >= 0.8,
            "memory_reduction_excluding_weight_grad_at_least_80pct": reduction_ex >= 0.8,
            "fused_no_slower_median": fused["time_s_median"] <= plain["time_s_median"],
            "fused_no_slower_min": fused["time_s_min"] <= plain["time_s_min"],
        },
        "environment": {
            "torch": plain["torch"],
            "threads": plain["threads"],
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "peak_reset_supported": plain["peak_reset_supported"] and fused["peak_reset_supported"],
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
