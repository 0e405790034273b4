"""What a model folder costs to keep and to run, measured on one device: the speed and memory columns of the
evaluation report. Numbers are measured, never estimated:

- parameters: every parameter of the loaded model once (a tied head is the embedding matrix);
- disk bytes: the sizes of the folder's weight files (*.safetensors; pytorch_model*.bin when it has none);
- peak memory: on CUDA, `torch.cuda.max_memory_allocated` from before the load to after the last run, minus
  what was allocated before (PyTorch's own tensors; the CUDA context and the caching allocator's slack are
  not counted); on the CPU, the peak resident set size (VmHWM) minus the resident set size before the load,
  the peak first reset to the current size through /proc/self/clear_refs (Linux >= 4.0; where that is
  refused, the peak since the process started). The model's code is imported first (an empty model built
  on the meta device), so the figure is the weights and the runs, not the library's modules. Memory an
  earlier model freed to the allocator but not to the system can be reused unseen, so the CPU figure is
  only exact in a process that loaded nothing before:
  `measure_in_fresh_process` runs `measure` in one;
- prefill tokens/s: `batch` prompts of `prompt_len` random token ids (seeded) through one forward that builds
  the KV cache and the last position's logits, batch x prompt_len / the median time of `repeats` runs;
- time to first token and decode tokens/s: greedy generation (`model.generate`, do_sample=False, KV cache)
  of `new_tokens` tokens from the same prompts, never stopping early (no end-of-sequence token); a logits
  processor stamps the time each step's logits are ready (the device synchronised first). Time to first
  token = from calling generate to the first step's logits (prefill included); decode tokens/s = batch x the
  steps after the first / the time between the first step's logits and the last's; medians of `repeats`.
Every timed run follows `warmup` untimed ones. The thread count and the device are recorded with the numbers.
"""

from __future__ import annotations

import gc
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from distill.models import load_causal_lm


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files a load reads: *.safetensors, or pytorch_model*.bin when there are none."""
    folder = Path(folder)
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set size (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that changes nothing and stamps when each generation step's logits are ready."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _median_seconds(run, repeats: int, warmup: int, device: torch.device) -> float:
    """The median wall time of `repeats` calls of `run()` after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    folder: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """The module docstring's measurements of the model in `folder`, loaded in this process on `device`
    (`dtype` and `attn_implementation` as `distill.models.load_causal_lm` takes them) with `threads` torch
    intra-op threads (None: as they are); the model is freed and the thread count restored afterwards."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: decode speed needs at least 2 generated tokens")
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(
            folder, device, dtype, attn_implementation, prompt_len, new_tokens, batch, repeats, warmup, seed
        )
    finally:  # the model, local to _measure, is gone: give its memory back before the next one loads
        torch.set_num_threads(threads_before)
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def _measure(
    folder: str | Path,
    device: str,
    dtype: str,
    attn_implementation: str,
    prompt_len: int,
    new_tokens: int,
    batch: int,
    repeats: int,
    warmup: int,
    seed: int,
) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

    dev = torch.device(device)
    with torch.device("meta"):  # import the model's code now: its modules would count as the model's memory
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        method = "cuda max_memory_allocated minus allocated before the load"
    else:
        method = "peak RSS (VmHWM) minus RSS before the load"
        if not _reset_peak_rss():
            method += " (VmHWM not resettable here: the peak since the process started)"
        before = _status_kib("VmRSS") * 1024

    model = load_causal_lm(folder, dtype, attn_implementation, dev).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(dev)
    mask = torch.ones_like(ids)
    last_only = (
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )
    prefill_s = _median_seconds(
        lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, **last_only), repeats, warmup, dev
    )

    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True
    )
    first_token, decode = [], []
    for run in range(warmup + repeats):
        clock = _StepClock(dev)
        _synchronize(dev)
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([clock]),
        )
        if run >= warmup:
            first_token.append(clock.times[0] - start)
            decode.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))  # per step

    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = _status_kib("VmHWM") * 1024 - before
    return {
        "folder": str(folder),
        "parameters": sum(p.numel() for p in model.parameters()),
        "disk_bytes": sum(f.stat().st_size for f in weight_files(folder)),
        "peak_memory_bytes": peak,
        "memory_method": method,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch / statistics.median(decode),
        "time_to_first_token_s": statistics.median(first_token),
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "settings": {
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "batch": batch,
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
        },
    }


def measure_in_fresh_process(folder: str | Path, **settings) -> dict:
    """`measure(folder, **settings)` in a new Python process (`python -m distill.report.speed`), so its peak
    memory is the model's alone and nothing loaded earlier shares its allocator or its caches."""
    args = json.dumps({"folder": str(folder), **settings})
    proc = subprocess.run(
        [sys.executable, "-m", "distill.report.speed", args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {folder} in a fresh process failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process": "fresh"}


def main() -> None:
    """`python -m distill.report.speed '<measure's arguments as JSON>'`: the result as one JSON line."""
    print(json.dumps(measure(**json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
