"""Atomic, verified DeepSpeed checkpoints.

Layout: <run>/checkpoints/step-000100/{ds/ (DeepSpeed shards), rng-rank*.safetensors, state.json,
manifest.json}. A checkpoint is written under a temporary name and renamed into place only once
every rank has finished and the manifest (sha256 of every file) is written, so a crash mid-write
never leaves a checkpoint that looks complete. Resuming verifies the manifest: a corrupt checkpoint
is an error, never a silent fresh start. DeepSpeed's files are read with `torch.load(weights_only=True)`
and an allowlist of the few DeepSpeed classes they contain, never with arbitrary unpickling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors.torch import load_file, save_file

from distill.files import sha256_file

_DS_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    pass


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (no arbitrary pickle)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_DS_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _write_manifest(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(ckpt)): sha256_file(p) for p in files}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present and intact."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} has no manifest.json: it is incomplete or not written by distill.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e}).") from e
    for rel, digest in manifest.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {ckpt} is missing {rel}; resume from an older one or start over."
            )
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} fails its checksum (corrupt or modified); resume from an older "
                f"checkpoint (delete this one) or start over with trainer.resume=off and a new run dir."
            )


def save(engine, root: Path, step: int, state: dict, keep: int) -> Path:
    """Collective: every rank writes its shards, rank 0 seals the checkpoint and prunes old ones."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier attempt at this step
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _write_manifest(tmp)
        if final.exists():  # same step saved before (e.g. a resumed run repeating a step): keep the new one
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load(engine, ckpt: Path) -> dict:
    """Collective: verify and load a checkpoint into `engine`; returns the saved trainer state."""
    verify(ckpt)
    load_path, _ = engine.load_checkpoint(
        str(ckpt), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt / 'ds'}.")
    rng = ckpt / f"rng-rank{dist.get_rank()}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["torch"])
    return json.loads((ckpt / "state.json").read_text())


def load_weights(engine, ckpt: Path, optimizer: bool) -> None:
    """Collective: start from another run's checkpoint (a curriculum's previous phase): its weights, and
    its optimizer state when `optimizer`; never its step, LR schedule or RNG (the new run has its own)."""
    verify(ckpt)
    load_path, _ = engine.load_checkpoint(
        str(ckpt),
        tag="ds",
        load_module_only=not optimizer,
        load_optimizer_states=optimizer,
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt / 'ds'}.")


def data_record(digest: str, seed: int, trainer, num_ranks: int) -> dict:
    """What a checkpoint records of the sample stream it trained on (state.json's "data"): the dataset's
    digest (dataset.json: shards, caps, weights, seq_len, tokenizer), the sampler's seed and the batch
    geometry. The sampler draws step s's global batch as a function of (seed, s, global batch) alone."""
    return {
        "digest": digest,
        "seed": int(seed),
        "micro_batch_size": int(trainer.micro_batch_size),
        "grad_accum_steps": int(trainer.grad_accum_steps),
        "num_ranks": int(num_ranks),
        "global_batch": int(trainer.micro_batch_size * trainer.grad_accum_steps * num_ranks),
        "max_steps": int(trainer.max_steps),
    }


def check_resume_data(ckpt: Path, now: dict) -> None:
    """Refuse to resume `ckpt` onto another sample stream (CheckpointError naming what changed), before
    any compute: other data, another sampler seed or another global batch would continue at a different
    sample position. Another split of the same global batch, or a longer max_steps, continues exactly
    (whether they are allowed is the run directory's rule: `trainer.allow_changes`, distill/rundir.py).
    Checkpoints written before this record existed carry none and are not compared."""
    recorded = json.loads((ckpt / "state.json").read_text()).get("data")
    if recorded is None:
        return
    why = {
        "digest": "the data differs (data sources, corpus files, caps, weights, data.seq_len or tokenizer)",
        "seed": "data.seed differs: the sampler would draw other sequences",
        "global_batch": "the global batch (micro_batch_size x grad_accum_steps x num_ranks) differs",
    }
    changed = [f"{why[k]}: recorded {recorded[k]!r}, now {now[k]!r}" for k in why if recorded[k] != now[k]]
    if changed:
        raise CheckpointError(
            f"{ckpt} was trained on another sample stream than this run would continue: "
            f"{'; '.join(changed)}. "
            f"Resume with the data and settings it was trained on, or start a new run (another run_dir, "
            f"trainer.resume=off). Nothing was changed."
        )


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None
