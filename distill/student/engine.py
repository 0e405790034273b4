"""DeepSpeed set-up for the student: ZeRO stage, precision, optimizer, warmup + cosine schedule.

The optimizer is a plain torch optimizer handed to DeepSpeed (ZeRO partitions its state); this keeps
the CPU path free of compiled DeepSpeed ops and the GPU path identical apart from precision.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from distill.config import TrainerConfig
from distill.student.checkpoint import SafeCheckpointEngine


def init_distributed(backend: str = "auto") -> tuple[int, int]:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30), verbose=False)
    return dist.get_rank(), dist.get_world_size()


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(t: TrainerConfig, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_student(
    path: str,
    t: TrainerConfig,
    world_size: int,
    attn_implementation: str = "auto",
    document_eos: int | None = None,
) -> torch.nn.Module:
    """The student model, ready for `build_engine`, on this rank's accelerator device.

    - Loaded in the training precision (`trainer.precision`): DeepSpeed keeps fp32 master weights in the
      optimizer for bf16/fp16, so half-precision weights here lose nothing it would not cast away itself.
    - Attention: `attn_implementation` ("auto": FlashAttention-2 where flash-attn is installed, the device is
      CUDA and the precision bf16/fp16; sdpa otherwise; distill/models.py).
    - ZeRO-3 (`trainer.zero_stage=3`): built inside `deepspeed.zero.Init` (through transformers'
      `HfDeepSpeedConfig`, which also loads the checkpoint shard by shard into the partitioned parameters),
      so no rank ever holds the whole model: a student larger than one device can start.
    - `document_eos` (not None): packed documents are kept apart (distill/documents.py).
    """
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    from distill.documents import isolate_documents
    from distill.models import load_causal_lm, resolve_attn_implementation, resolve_model

    device = torch.device(get_accelerator().current_device_name())
    dtype = _COMPUTE_DTYPES[t.precision]
    attn = resolve_attn_implementation(attn_implementation, device, dtype)
    if t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        folder = resolve_model(path)
        zero3 = HfDeepSpeedConfig(deepspeed_config(t, world_size))  # noqa: F841 (read through a weakref)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                attn_implementation=attn,
                use_safetensors=any(folder.glob("*.safetensors")),
                local_files_only=True,
            )
        finally:  # later from_pretrained calls in this process (none today) must not partition
            unset_hf_deepspeed_config()
    else:
        model = load_causal_lm(path, dtype=dtype, attn_implementation=attn, device=device)
    if document_eos is not None:
        isolate_documents(model, document_eos)
    return model


def import_deepspeed_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with its `@torch.compile` decorators left off.

    Under ZeRO, DeepSpeed imports that module to ask whether the optimizer is a Muon (and in its gradient
    reduction); its functions are decorated with torch.compile at import, which loads the whole inductor
    stack: about 5 s of CPU per rank on a 2-core machine, at every start and requeue. Our optimizers are
    AdamW and SGD, so those functions never run; imported here first with DeepSpeed's `compile()` returning
    the function unchanged, they would run eagerly (correct, uncompiled) if anything called them."""
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    from deepspeed.runtime import compiler

    real = compiler.compile
    compiler.compile = lambda: lambda fn: fn
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without Muon: nothing to do
        pass
    finally:
        compiler.compile = real


def build_engine(model: torch.nn.Module, t: TrainerConfig, world_size: int, extra_params=()):
    """Wrap `model` (and any extra trainable modules' params) in a DeepSpeed engine."""
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    )
    import_deepspeed_muon_uncompiled()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, world_size)
    )
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)  # loads with weights_only=True
    return engine


def export_pretrained(engine, tokenizer, out_dir: Path) -> None:
    """Collective: gather the (possibly ZeRO-3 partitioned) weights and save a Hugging Face folder.

    Written to a temporary folder and renamed, so an interrupted export never replaces a good one.
    """
    model = engine.module.model
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(
        params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3
    ):
        if dist.get_rank() == 0:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    dist.barrier()
