"""A run's data, prepared once before any model loads: every entry point (train, cache) calls this.

Text sources go through tokenised shards: `data.source` is either a finished tokenisation (a folder with
`manifest.json`, from `python -m launch.tokenize`), checked from metadata in seconds, or raw text / JSONL /
Parquet / a builtin corpus, tokenised on first use into `$DISTILL_CACHE/tokenized/<key>` by the same code
(the key covers the input files' names, sizes and mtimes, the tokenizer and the split settings, so a sweep
tokenises once and a changed corpus is tokenised anew). Prompt + completion data (`data.format=completions`,
post-training sized) is packed in memory and stored in the same shard format with a target-mask twin.

Written under the run's `data/`: `dataset.json` (which shards, `seq_len`, caps and weights per source, and
a digest of it all: the identity a resume must match) and the small held-out arrays evaluation reads
(`heldout.npy`, `heldout_source.npy` with several sources, `heldout_mask.npy` for completions).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from distill.data.completions import load_completions, pack_examples, split_by_prompt
from distill.data.corpus import BUILTIN_CORPORA, DataError, corpus_files
from distill.data.indexed import ShardWriter, token_dtype
from distill.data.packing import PackedDataset
from distill.data.shards import check_dataset, dataset_windows, manifest_digest, read_manifest
from distill.data.tokenize import TokenizeSpec, tokenize, tokenizer_identity, write_manifest
from distill.files import default_cache_dir, sha256_file, write_json_atomic

log = logging.getLogger("distill")


def tokenized_cache_dir() -> Path:
    return default_cache_dir() / "tokenized"


def _listing(spec: TokenizeSpec) -> list:
    """Names, sizes and mtimes of the input files: a changed corpus gets a new auto-tokenisation."""
    if spec.source in BUILTIN_CORPORA:
        return [spec.source]
    root = Path(spec.source).expanduser().resolve()
    files = corpus_files(root, spec.format)
    return [[str(f), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def tokenized_source(source: str, fmt: str, text_field: str, tokenizer_dir: str, data_cfg) -> Path:
    """The tokenised dataset for one text source: the given tokenisation, or one made on first use."""
    path = Path(source).expanduser()
    tok_sha = tokenizer_identity(tokenizer_dir)["sha256"]
    if (path / "manifest.json").is_file() or (path / "plan.json").is_file():
        fraction = check_dataset(path, tok_sha, tokenizer_dir)["spec"]["heldout_fraction"]
        if fraction != data_cfg.heldout_fraction:
            log.warning(
                "%s: its held-out split (%.3g of documents) was fixed when it was tokenised; "
                "data.heldout_fraction=%g does not apply to it",
                path,
                fraction,
                data_cfg.heldout_fraction,
            )
        return path.resolve()
    spec = TokenizeSpec(
        source=source,
        tokenizer=tokenizer_dir,
        format=fmt,
        text_field=text_field,
        heldout_fraction=data_cfg.heldout_fraction,
        split_seed=data_cfg.seed,
    )
    key = json.dumps([_listing(spec), tok_sha, fmt, text_field, spec.heldout_fraction, spec.split_seed])
    out = tokenized_cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:20]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # sweep points starting together: one tokenises
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").is_file():
            log.info("tokenising %s into %s (once; later runs reuse it)", source, out)
            tokenize(spec, out, workers=data_cfg.tokenize_workers)
    check_dataset(out, tok_sha, tokenizer_dir)
    return out


def _heldout_windows(folder: Path, seq_len: int, wanted: int, num_ranks: int, what: str) -> np.ndarray:
    windows = dataset_windows(folder, "heldout", seq_len)
    n_eval = min(wanted, len(windows)) // num_ranks * num_ranks
    if n_eval == 0:
        raise DataError(
            f"the held-out split of {what} packs into {len(windows)} sequence(s) of {seq_len} tokens, fewer "
            f"than the {num_ranks} ranks that evaluate it; raise data.heldout_fraction (for a tokenised "
            f"dataset: its heldout_fraction) or lower data.seq_len."
        )
    return windows.read(np.arange(n_eval))


def _check_size(folder: Path, source: str, seq_len: int, what: str) -> None:
    totals = read_manifest(folder)["totals"]
    tokens = totals["train"]["tokens"] + totals["heldout"]["tokens"]
    if tokens == 0:
        raise DataError(f"data.source={source!r} holds no text: every document is empty.")
    if tokens < seq_len:
        raise DataError(
            f"{what} has {tokens} tokens, fewer than one sequence of data.seq_len={seq_len}; add text or "
            f"lower data.seq_len."
        )


def _sources(data_cfg) -> list[dict]:
    if data_cfg.sources:
        trained = data_cfg.train_sources
        return [
            {
                "name": s.name,
                "source": s.source,
                "format": s.format,
                "text_field": s.text_field,
                "cap": s.max_train_sequences,
                "weight": s.weight,
                "trained": trained is None or s.name in trained,
            }
            for s in data_cfg.sources
        ]
    return [
        {
            "name": "data",
            "source": data_cfg.source,
            "format": data_cfg.format,
            "text_field": data_cfg.text_field,
            "cap": data_cfg.max_train_sequences,
            "weight": None,
            "trained": True,
        }
    ]


def prepare_datasets(
    data_cfg,
    tokenizer_dir: str,
    out_dir: Path,
    num_ranks: int,
    global_batch: int,
    check: Callable[[dict], None] | None = None,
) -> dict:
    """Write the run's `dataset.json` and held-out arrays under `out_dir`; returns the dataset spec.

    Re-running on an existing run directory (a resume) must find the same data: a changed corpus,
    tokenizer or data setting is an error instead of silently training on other sequences. `check` sees
    the spec before anything is written (a resume compares it with its checkpoint's record)."""
    seq_len = data_cfg.seq_len
    if data_cfg.format == "completions":
        entries, heldout = _prepare_completions(data_cfg, tokenizer_dir, out_dir, num_ranks)
        heldout_ids = None
    else:
        entries, parts, ids = [], [], []
        for i, src in enumerate(_sources(data_cfg)):
            folder = tokenized_source(
                src["source"], src["format"], src["text_field"], tokenizer_dir, data_cfg
            )
            what = f"source {src['name']}" if data_cfg.sources else "the corpus"
            _check_size(folder, src["source"], seq_len, what)
            if src["trained"]:
                windows = len(dataset_windows(folder, "train", seq_len, src["cap"]))
                if windows == 0:
                    raise DataError(
                        f"the training split of {what} ({folder}) holds fewer than one sequence of "
                        f"data.seq_len={seq_len} tokens; add text or lower data.seq_len."
                    )
                entry = {"name": src["name"], "source_index": i, "path": str(folder)}
                entry["manifest_sha256"] = manifest_digest(folder)
                entries.append({**entry, "cap": src["cap"], "weight": src["weight"], "windows": windows})
            held = _heldout_windows(folder, seq_len, data_cfg.heldout_sequences, num_ranks, what)
            parts.append(held)
            ids.append(np.full(len(held), i, np.uint8))
        heldout = {"heldout": np.concatenate(parts)}
        heldout_ids = np.concatenate(ids) if data_cfg.sources else None
    total = sum(e["windows"] for e in entries)
    if total < global_batch:
        raise DataError(
            f"the training split packs into {total} sequences of {seq_len} tokens, fewer than one global "
            f"batch ({global_batch}); add text, lower data.seq_len or shrink the batch."
        )
    if heldout_ids is not None:
        heldout["heldout_source"] = heldout_ids
    spec = {"seq_len": seq_len, "sources": entries}
    content = [{k: v for k, v in e.items() if k not in ("path", "mask_path")} for e in entries]  # not where
    spec["digest"] = hashlib.sha256(json.dumps([seq_len, content], sort_keys=True).encode()).hexdigest()[:16]
    spec["heldout_sha256"] = hashlib.sha256(b"".join(a.tobytes() for a in heldout.values())).hexdigest()
    existing = out_dir / "dataset.json"
    if existing.is_file():
        before = json.loads(existing.read_text())
        if (before.get("digest"), before.get("heldout_sha256")) != (spec["digest"], spec["heldout_sha256"]):
            raise DataError(
                f"{existing} was built from different data than the current data config / tokenizer; a "
                f"resumed run must train on the same data (restore the original data settings or use a new "
                f"run dir)."
            )
    if check is not None:
        check(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in heldout.items():
        PackedDataset(array).save(out_dir / f"{name}.npy")
    write_json_atomic(existing, spec)
    return spec


def _prepare_completions(
    data_cfg, tokenizer_dir: str, out_dir: Path, num_ranks: int
) -> tuple[list[dict], dict]:
    """Prompt + completion windows, packed in memory, stored as one shard (ids) plus its mask twin."""
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    generated = data_cfg.tokens == "generated"  # the generator's ids as they are, not the text re-tokenised
    rows = load_completions(data_cfg.source, generated_ids=generated)
    train_rows, heldout_rows = split_by_prompt(rows, data_cfg.heldout_fraction, data_cfg.seed)
    seq_len = data_cfg.seq_len
    train, train_mask = pack_examples(
        train_rows, tokenizer, seq_len, "training split", generated_ids=generated
    )
    heldout, heldout_mask = pack_examples(
        heldout_rows, tokenizer, seq_len, "held-out split", generated_ids=generated
    )
    if data_cfg.max_train_sequences:
        n = data_cfg.max_train_sequences
        train, train_mask = PackedDataset(train.tokens[:n]), train_mask[:n]
    n_eval = min(data_cfg.heldout_sequences, len(heldout)) // num_ranks * num_ranks
    if n_eval == 0:
        raise DataError(
            f"the held-out split packs into {len(heldout)} sequence(s), fewer than the {num_ranks} ranks "
            f"that evaluate it; raise data.heldout_fraction or lower data.seq_len."
        )
    paths = {}
    for name, windows in (("completions", train.tokens), ("completions_mask", train_mask.astype(np.uint8))):
        folder = out_dir / name
        paths[name] = folder
        _write_windows(folder, windows, token_dtype(len(tokenizer)) if name == "completions" else np.uint8)
    entry = {
        "name": "data",
        "path": str(paths["completions"]),
        "mask_path": str(paths["completions_mask"]),
        "manifest_sha256": manifest_digest(paths["completions"]),
        "cap": None,
        "weight": None,
        "windows": len(train),
    }
    arrays = {"heldout": heldout.tokens[:n_eval], "heldout_mask": heldout_mask[:n_eval]}
    return [entry], arrays


def _write_windows(folder: Path, windows: np.ndarray, dtype) -> None:
    """Packed windows as a one-shard tokenised dataset (each window one document of seq_len ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("train", "heldout", "done"):
        (folder / sub).mkdir(exist_ok=True)
    shards = {}
    for split, rows in (("train", windows), ("heldout", windows[:0])):
        prefix = folder / split / "part-00000"
        writer = ShardWriter(prefix, dtype)
        for row in rows:
            writer.add(row)
        writer.finish()
        shards[split] = {"tokens": writer.tokens, "documents": len(writer.lengths)}
        for suffix in ("bin", "idx"):  # the manifest's digest identifies the content
            shards[split][f"{suffix}_sha256"] = sha256_file(prefix.with_suffix(f".{suffix}"))
    plan = {"spec": {"source": "completions"}, "tokenizer": {"dtype": np.dtype(dtype).name, "sha256": None}}
    record = {"piece": 0, "name": "part-00000", **shards}
    write_manifest(folder, plan, {0: record})
