"""Soft labels from one generation pass: the top-k log-probs `launch.generate store=topk` kept on every
completion token, laid out on the packed `data=completions` rows as a teacher-signal cache, so
`teacher=cached` trains with KD on completions with no second teacher pass (`launch.cache
cache.from_generation=true`).

Alignment: the top-k stored at generation step t is the teacher's distribution of completion token t, so
it belongs to the packed position just before that token (the loss at position p predicts token p + 1).
Exactly the positions `position_mask` counts get a signal; every other position (prompt, padding, the
last of a window) holds NaN values and index 0, which the loss mask drops before any computation.

The signals are only valid on the generated tokens themselves, so every packed example must equal the
generation's prompt_ids + completion_ids. `data.tokens=generated` packs exactly those (the student
sharing the teacher's tokenizer); with `data.tokens=text` the completion text is re-tokenised, which a
sampled non-canonical tokenisation or a stop token other than EOS breaks, and such examples are refused.
Each stored distribution is conditioned on the example's prompt alone, as it was generated; a live
teacher on a packed row would also see the examples packed before it in the window.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from distill.cache.manifest import CacheError
from distill.cache.writer import shard_tensors
from distill.data.completions import load_completions, pack_examples, position_mask, split_by_prompt

COLUMNS = ("prompt_ids", "completion_ids", "topk_values", "topk_ids", "token_logprob")


def read_generation(source: str, k: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The generation's rows (prompt, completion, finished, generated ids, `_row`) in the order
    `load_completions` reads them, and its per-token arrays over all rows: `values` [tokens, k] float32,
    `ids` [tokens, k], `logprob` [tokens] and `offsets` [rows + 1] (row r's tokens are offsets[r]:[r+1])."""
    folder = Path(source).expanduser()
    meta_path = folder / "generation.json"
    if not meta_path.is_file():
        raise CacheError(
            f"cache.from_generation needs data.source to be a folder `launch.generate` wrote; {folder} "
            f"has no generation.json."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("store") != "topk":
        raise CacheError(
            f"{folder} was generated with store={meta.get('store')}, so it holds no teacher top-k; "
            f"regenerate with store=topk, or write the cache with the live teacher (no from_generation)."
        )
    if k > meta["topk"]:
        raise CacheError(
            f"stream.topk={k} exceeds the top-{meta['topk']} the generation stored ({folder}); set "
            f"stream.topk<={meta['topk']} here and in training."
        )
    files = sorted(folder.glob("*.parquet"))
    if list(folder.glob("*.jsonl")):
        raise CacheError(f"{folder} mixes .jsonl files with the generation's parts; move them elsewhere.")
    table = pq.read_table(files)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise CacheError(
            f"{folder} has no {', '.join(missing)} column(s) (written by an older launch.generate); "
            f"regenerate into a new out=... with store=topk."
        )
    rows = table.select(["prompt", "completion", "finished", "prompt_ids", "completion_ids"]).to_pylist()
    if [(r["prompt"], r["completion"], r["finished"]) for r in rows] != [
        (r["prompt"], r["completion"], r["finished"]) for r in load_completions(source)
    ]:
        raise CacheError(f"{folder}: its rows read back in another order than data=completions reads them.")
    for index, row in enumerate(rows):
        row["_row"] = index

    def flat(name: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
        array = table.column(name).combine_chunks()
        offsets = array.offsets.to_numpy()
        for _ in range(depth):
            array = array.flatten()
        return offsets - offsets[0], array.to_numpy(zero_copy_only=False)

    offsets, values = flat("topk_values", 2)
    _, ids = flat("topk_ids", 2)
    log_offsets, logprob = flat("token_logprob", 1)
    stored = meta["topk"]
    lengths = np.array([len(r["completion_ids"]) for r in rows])
    if not (np.array_equal(np.diff(offsets), lengths) and np.array_equal(log_offsets, offsets)):
        raise CacheError(f"{folder}: stored top-k rows do not match the completion lengths (damaged parts).")
    arrays = {
        "values": values.reshape(-1, stored)[:, :k].astype(np.float32),
        "ids": ids.reshape(-1, stored)[:, :k],
        "logprob": logprob.astype(np.float32),
        "offsets": offsets,
    }
    return rows, arrays


def lay_out(
    rows: list[dict],
    arrays: dict[str, np.ndarray],
    tokenizer,
    seq_len: int,
    packed: np.ndarray,
    what: str,
    index_dtype: np.dtype,
    generated_ids: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [N, T, k] float32, ids [N, T, k], target log-prob [N, T - 1]) for the packed rows `packed`
    [N, T] of one split (`rows` in the order the packer got them); NaN / 0 where no signal belongs."""
    layout: list = []
    tokens, targets = pack_examples(rows, tokenizer, seq_len, what, layout, generated_ids)
    n, k = len(packed), arrays["values"].shape[1]
    if not np.array_equal(tokens.tokens[:n], packed):
        raise CacheError(f"the {what} packs differently than the run's data; check data.* and the tokenizer.")
    values = np.full((n, seq_len, k), np.nan, dtype=np.float32)
    ids = np.zeros((n, seq_len, k), dtype=index_dtype)
    target = np.full((n, seq_len - 1), np.nan, dtype=np.float32)
    mismatched = []
    for index, window, offset, prompt_len, example in layout:
        if window >= n:
            break
        row = rows[index]
        if example != row["prompt_ids"] + row["completion_ids"]:
            mismatched.append(row)
            continue
        start = arrays["offsets"][row["_row"]]
        count = min(len(row["completion_ids"]), seq_len - offset - prompt_len)  # a cut example keeps its head
        first = offset + prompt_len - 1  # the position that predicts completion token 0
        values[window, first : first + count] = arrays["values"][start : start + count]
        ids[window, first : first + count] = arrays["ids"][start : start + count]
        target[window, first : first + count] = arrays["logprob"][start : start + count]
    if mismatched:
        row = mismatched[0]
        raise CacheError(
            f"{len(mismatched)} packed example(s) of the {what} differ from the tokens the teacher generated "
            f"(first: prompt {row['prompt']!r:.60}): soft labels belong to the generated ids, and the text "
            f"re-tokenises differently (a sampled non-canonical tokenisation, a stop token other than EOS, "
            f"or another tokenizer). Set data.tokens=generated here and in training to pack the generated "
            f"ids as they are (the student must share the teacher's tokenizer)."
        )
    if not np.array_equal(~np.isnan(values[..., 0]), position_mask(targets[:n])):
        raise CacheError(f"internal: the {what}'s signals do not cover exactly the counted positions.")
    return values, ids, target


def generation_signals(
    data_cfg, tokenizer, k: int, packed: dict[str, np.ndarray], index_dtype: np.dtype
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per split ("train", "heldout"): the signals `lay_out` builds for the run's packed arrays."""
    rows, arrays = read_generation(data_cfg.source, k)
    train_rows, heldout_rows = split_by_prompt(rows, data_cfg.heldout_fraction, data_cfg.seed)
    ids = data_cfg.tokens == "generated"
    return {
        split: lay_out(split_rows, arrays, tokenizer, data_cfg.seq_len, packed[split], what, index_dtype, ids)
        for split, split_rows, what in (
            ("train", train_rows, "training split"),
            ("heldout", heldout_rows, "held-out split"),
        )
    }


def shard(
    input_ids: np.ndarray, values: np.ndarray, ids: np.ndarray, target: np.ndarray | None, fmt: str
) -> dict[str, torch.Tensor]:
    """A cache shard's tensors (`shard_tensors`), with NaN values wherever no signal belongs: encoded
    from zeros there, then marked, so int8 codes stay well defined and nothing reads filler as a signal."""
    filler = torch.from_numpy(np.isnan(values[..., 0]))
    tensors = shard_tensors(input_ids, np.nan_to_num(values, nan=0.0), ids, fmt, target_logprob=target)
    for key in ("top", "step") if fmt == "int8" else ("values",):
        tensors[key][filler] = float("nan")
    return tensors
