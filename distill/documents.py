"""Packed documents kept apart: attention never crosses a document boundary inside a training window.

Training windows are cut from EOS-separated documents (distill/data/shards.py), so one window holds the
end of one document, whole documents and the start of another. Left alone, every token attends to the
documents before it in the window, which it would never see at inference, and its rotary position counts
from the window start rather than its document's start. With `data.document_isolation` (opt-in; plain
text only) every model forward on packed rows — the student's training and evaluation forwards, and the
teacher's scoring of the same rows — gets:

- **position ids that restart at 0 for each document**; the boundary rule: token t starts a new document
  when t is the first token of the window or token t - 1 is EOS. EOS therefore closes its document
  (it is that document's last token and is predicted from it); the token after it opens the next one.
  A window's first document starts at position 0 even when it began in an earlier window.
- **attention restricted to the token's own document**, causally:
  - sdpa / eager: Hugging Face turns restarting position ids (with no attention mask and no cache) into a
    block-diagonal causal mask (`transformers.masking_utils.find_packed_sequence_indices`);
  - FlashAttention-2: varlen attention over the flattened batch, from cumulative document lengths
    (`cu_seq_lens_q/k`, passed as attention kwargs), so no [T, T] mask exists at all.

`isolate_documents(model, eos_id)` installs this as forward pre-hooks on the model and its decoder, so
every caller that passes only `input_ids` (the training objective, `distill/eval.py`, the teacher actor)
gets it without change; a caller that passes its own `attention_mask`, `position_ids`, a cache or
embeddings (generation) is left alone.
"""

from __future__ import annotations

from typing import Any

import torch

_HOOKED = "_distill_document_eos"  # attribute marking a module whose forward already isolates documents


def document_starts(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Bool [B, T]: True where a new document starts (the first token, and every token right after EOS)."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    return starts


def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids [B, T] (int64) counting from 0 at each document start (`document_starts`)."""
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    start_index = torch.where(document_starts(input_ids, eos_id), index, torch.zeros_like(index))
    return index - start_index.cummax(dim=1).values


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """FlashAttention-2 varlen arguments for the whole batch flattened into one sequence of documents.

    Every row starts a document (position 0), so the flattened boundaries are exactly the positions equal
    to 0. The maximum length is bounded by the row length rather than measured, which saves a host sync
    (flash-attn sizes its grid from it; an upper bound is valid)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    total = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    cu_seq_lens = torch.cat([starts, total])
    longest = int(position_ids.shape[1])
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def packed_forward_kwargs(input_ids: torch.Tensor, eos_id: int, attn_implementation: str) -> dict[str, Any]:
    """The keyword arguments that make a Hugging Face causal LM forward treat each document of the packed
    rows `input_ids` [B, T] on its own: restarting position ids, no cache (a cache disables HF's packed-mask
    detection), and for FlashAttention-2 the varlen boundaries."""
    position_ids = document_position_ids(input_ids, eos_id)
    kwargs: dict[str, Any] = {"position_ids": position_ids, "use_cache": False}
    if attn_implementation.startswith("flash_attention"):
        kwargs.update(flash_varlen_kwargs(position_ids))
    return kwargs


def _hook(eos_id: int, config) -> Any:
    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        own = ("attention_mask", "position_ids", "inputs_embeds", "past_key_values", "cache")
        if input_ids is None or input_ids.dim() != 2 or any(kwargs.get(k) is not None for k in own):
            return None  # generation, or a caller that lays out attention itself
        attn = getattr(config, "_attn_implementation", None) or "sdpa"
        return args, {**kwargs, **packed_forward_kwargs(input_ids, eos_id, attn)}

    return pre_hook


def isolate_documents(model: torch.nn.Module, eos_id: int) -> torch.nn.Module:
    """Make every plain `model(input_ids=...)` (and its decoder's) keep EOS-separated documents apart.

    Returns `model`, changed in place (hooks are not saved with the weights: an exported model is a plain
    Hugging Face model). Calling it twice is harmless."""
    modules = [model]
    if hasattr(model, "get_decoder") and model.get_decoder() is not model:
        modules.append(model.get_decoder())
    for module in modules:
        if getattr(module, _HOOKED, None) is None:
            module.register_forward_pre_hook(_hook(int(eos_id), model.config), with_kwargs=True)
            setattr(module, _HOOKED, int(eos_id))
    return model


def isolation_enabled(data) -> bool:
    """Whether a run keeps documents apart (`data` is the run's `data` config): `data.document_isolation`,
    except when any source is `format=completions`, whose windows are whole prompt + completion examples
    in which EOS (a chat template's end-of-turn token) may occur inside the prompt: EOS is no document
    boundary there."""
    formats = {data.format, *(source.format for source in data.sources)}
    return bool(data.document_isolation) and "completions" not in formats
