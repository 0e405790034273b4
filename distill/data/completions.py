"""Prompt + completion examples (e.g. teacher-generated, `launch.generate`) packed for fine-tuning.

Each example is tokenised with the STUDENT's tokenizer: the prompt through its chat template (when it
has one), then the completion text, then EOS when the completion ended on its own (a completion cut at
max_new_tokens gets no EOS, so the student is not taught to stop there). Whole examples are packed
greedily into `seq_len` windows and the rest of a window is EOS padding; an example longer than a
window is truncated. Alongside the tokens goes a per-token target mask: True on completion tokens (and
their EOS), False on prompt and padding tokens, so prompt tokens carry no loss.

`data.tokens=generated` packs the ids the teacher generated instead (prompt_ids + completion_ids of a
`launch.generate` folder, its stop token included): the exact sequences it sampled, which text does not
always re-tokenise to, and the tokens its stored top-k belong to (soft labels, distill/cache/generation.py).
It needs the student to share the generator's tokenizer; every prompt's encoding is checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from distill.data.corpus import DataError
from distill.data.packing import PackedDataset


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model sees it: the chat template with the generation prompt, or the plain text."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def load_completions(source: str, generated_ids: bool = False) -> list[dict]:
    """{prompt, completion, finished} rows from the generator's output folder (parquet parts) or from any
    .jsonl / .parquet file or folder with `prompt` and `completion` columns (`finished` defaults to True);
    with `generated_ids` also the generator's prompt_ids and completion_ids."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.parquet")) + sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise DataError(
            f"data.source={source!r}: no completions there; give the folder `launch.generate` wrote "
            f"(out=...) or a .jsonl/.parquet file with prompt and completion columns."
        )
    tables = [pq.read_table(f) if f.suffix == ".parquet" else pa_json.read_json(f) for f in files]
    rows = []
    for f, table in zip(files, tables):
        missing = {"prompt", "completion"} - set(table.column_names)
        if missing:
            raise DataError(f"{f} has no {' or '.join(sorted(missing))} column (data.format=completions).")
        if generated_ids and not {"prompt_ids", "completion_ids"} <= set(table.column_names):
            raise DataError(
                f"data.tokens=generated: {f} has no prompt_ids / completion_ids columns; give the folder "
                f"`launch.generate` wrote, or use data.tokens=text."
            )
        if "finished" not in table.column_names:
            table = table.append_column("finished", pa.array([True] * len(table)))
        columns = ["prompt", "completion", "finished"] + ["prompt_ids", "completion_ids"] * generated_ids
        rows += table.select(columns).to_pylist()
    if not rows:
        raise DataError(f"data.source={source!r} holds no completions.")
    return rows


def split_by_prompt(rows: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out PROMPTS (every sample of a prompt on one side), chosen by a hash of the prompt text."""
    prompts = sorted(
        {r["prompt"] for r in rows}, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest()
    )
    n_heldout = max(1, round(len(prompts) * heldout_fraction))
    if n_heldout >= len(prompts):
        raise DataError(
            f"only {len(prompts)} distinct prompt(s): too few to hold out {heldout_fraction:.0%}."
        )
    heldout = set(prompts[:n_heldout])
    return [r for r in rows if r["prompt"] not in heldout], [r for r in rows if r["prompt"] in heldout]


def pack_examples(
    rows: list[dict],
    tokenizer,
    seq_len: int,
    what: str = "completions",
    layout: list | None = None,
    generated_ids: bool = False,
) -> tuple[PackedDataset, np.ndarray]:
    """Token windows [N, seq_len] and their target mask [N, seq_len] (True = completion token).

    `layout`, when given, receives (row index, window, offset, prompt length, untruncated ids) for every
    example placed, so a soft-label cache can put each generated token's top-k where the token went."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the student tokenizer has no eos_token; set one to end completions and pad windows.")
    windows, masks, ids, mask = [], [], [], []

    def flush() -> None:
        pad = seq_len - len(ids)
        windows.append(ids + [eos] * pad)
        masks.append(mask + [False] * pad)
        ids.clear(), mask.clear()

    for index, row in enumerate(rows):
        prompt = prompt_ids(tokenizer, row["prompt"])
        if generated_ids:
            check_generated_prompt(row, prompt, len(tokenizer))
            completion = list(row["completion_ids"])
        else:
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            completion += [eos] if row["finished"] else []
        tokens = (prompt + completion)[:seq_len]
        targets = ([False] * len(prompt) + [True] * len(completion))[:seq_len]
        if not any(targets):
            continue  # the prompt alone fills the window: nothing to learn from
        if len(ids) + len(tokens) > seq_len:
            flush()
        if layout is not None:
            layout.append((index, len(windows), len(ids), len(prompt), prompt + completion))
        ids += tokens
        mask += targets
    if ids:
        flush()
    if not masks or not np.any(masks):
        raise DataError(
            f"the {what} hold no completion token within data.seq_len={seq_len}; raise data.seq_len "
            f"(prompts are longer than a window) or check that the completions are not empty."
        )
    dtype = np.int32 if len(tokenizer) > np.iinfo(np.uint16).max else np.uint16
    return PackedDataset(np.asarray(windows, dtype=dtype)), np.asarray(masks, dtype=np.bool_)


def check_generated_prompt(row: dict, prompt: list[int], vocab: int) -> None:
    """data.tokens=generated: the student must encode the prompt as the generator did (same tokenizer and
    chat template), or the generated ids mean other tokens to it."""
    if row["prompt_ids"] != prompt or max(row["completion_ids"], default=0) >= vocab:
        raise DataError(
            f"data.tokens=generated: the student's tokenizer encodes the prompt {row['prompt']!r:.60} "
            f"differently from the teacher that generated the completions (or its vocabulary is smaller): "
            f"the generated ids are only valid for the generator's tokenizer. Use data.tokens=text "
            f"(re-tokenise the completion text) with a student of another tokenizer."
        )


def position_mask(targets: np.ndarray) -> np.ndarray:
    """Target mask per token -> which positions count in the loss: position t predicts token t + 1, so
    it counts when token t + 1 is a target; the last position of a window predicts nothing here."""
    positions = np.zeros_like(targets, dtype=np.bool_)
    positions[:, :-1] = targets[:, 1:]
    return positions


def load_position_mask(path: Path) -> np.ndarray | None:
    """The positions that count for a packed split, from its `<split>_mask.npy`; None when there is none
    (plain text: every position counts)."""
    return position_mask(np.load(path, allow_pickle=False)) if path.exists() else None
