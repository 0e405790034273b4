"""Several named data sources in one run: packed per source, every sequence tagged with its source.

Each source is split (documents) and packed on its own, so no sequence straddles two sources and its
teacher is well defined. Written next to the usual arrays: `train_source.npy` / `heldout_source.npy` hold
each sequence's index into `data.sources`; every source keeps `data.heldout_sequences` held-out
sequences (a per-domain evaluation set), even when it is not trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.data.corpus import DataError, load_documents, split_documents
from distill.data.packing import PackedDataset, pack_documents


def _pack_source(src, data_cfg, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    docs = load_documents(src.source, src.format, src.text_field)
    train_docs, heldout_docs = split_documents(docs, data_cfg.heldout_fraction, data_cfg.seed)
    train = pack_documents(train_docs, tokenizer, data_cfg.seq_len, what=f"training split of {src.name}")
    heldout = pack_documents(heldout_docs, tokenizer, data_cfg.seq_len, what=f"held-out split of {src.name}")
    rows = train.tokens[: src.max_train_sequences] if src.max_train_sequences else train.tokens
    return rows, heldout.tokens


def prepare_sources(data_cfg, tokenizer, out_dir: Path, num_ranks: int, global_batch: int) -> None:
    """Write train / heldout arrays and their per-sequence source ids under `out_dir`."""
    trained = (
        data_cfg.train_sources if data_cfg.train_sources is not None else [s.name for s in data_cfg.sources]
    )
    train_parts, train_ids, heldout_parts, heldout_ids = [], [], [], []
    for i, src in enumerate(data_cfg.sources):
        train, heldout = _pack_source(src, data_cfg, tokenizer)
        n_eval = min(data_cfg.heldout_sequences, len(heldout)) // num_ranks * num_ranks
        if n_eval == 0:
            raise DataError(
                f"the held-out split of source {src.name} packs into {len(heldout)} sequence(s), fewer than "
                f"the {num_ranks} ranks that evaluate it; raise data.heldout_fraction or lower data.seq_len."
            )
        heldout_parts.append(heldout[:n_eval])
        heldout_ids.append(np.full(n_eval, i, np.uint8))
        if src.name in trained:
            train_parts.append(train)
            train_ids.append(np.full(len(train), i, np.uint8))
    train = np.concatenate(train_parts)
    if len(train) < global_batch:
        raise DataError(
            f"the trained sources {list(trained)} pack into {len(train)} sequences of {data_cfg.seq_len} "
            f"tokens, fewer than one global batch ({global_batch}); add text or shrink the batch."
        )
    arrays = {
        "train": train,
        "train_source": np.concatenate(train_ids),
        "heldout": np.concatenate(heldout_parts),
        "heldout_source": np.concatenate(heldout_ids),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        save_or_check(out_dir / f"{name}.npy", PackedDataset(array))


def save_or_check(path: Path, dataset: PackedDataset) -> None:
    """Write once; on a resume the same data must come out (else an error, never silently other data)."""
    if not path.exists():
        dataset.save(path)
    elif PackedDataset.load(path).digest() != dataset.digest():
        raise DataError(
            f"{path} was built from different data than the current data config / tokenizer; a resumed "
            f"run must train on the same data (restore the original data settings or use a new run dir)."
        )


def domains(data_dir: Path, names: list[str], rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's share of every source's held-out sequences, by source name."""
    heldout = np.load(data_dir / "heldout.npy", allow_pickle=False)
    source = np.load(data_dir / "heldout_source.npy", allow_pickle=False)
    return {name: heldout[source == i][rank::world] for i, name in enumerate(names)}


def train_sources(data_dir: Path) -> np.ndarray:
    return np.load(data_dir / "train_source.npy", allow_pickle=False)
