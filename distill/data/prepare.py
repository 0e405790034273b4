"""Build the run's train / held-out token arrays once, in the driver, before any model loads."""

from __future__ import annotations

from pathlib import Path

from distill.data.completions import load_completions, pack_examples, split_by_prompt
from distill.data.corpus import DataError, load_documents, split_documents
from distill.data.packing import PackedDataset, pack_documents


def prepare_datasets(data_cfg, tokenizer, out_dir: Path, num_ranks: int, global_batch: int) -> None:
    """Write `train.npy` and `heldout.npy` under `out_dir` (with `data.format=completions` also
    `train_mask.npy` and `heldout_mask.npy`: which tokens are completion tokens, the only ones with loss).

    Re-running on an existing run directory (a resume) must see the same data: a changed corpus or
    tokenizer is an error instead of silently training on different sequences.
    """
    if data_cfg.format == "completions":  # prompt + completion examples, split by prompt
        ids = data_cfg.tokens == "generated"  # the generator's ids as they are, not the text re-tokenised
        rows = load_completions(data_cfg.source, generated_ids=ids)
        train_rows, heldout_rows = split_by_prompt(rows, data_cfg.heldout_fraction, data_cfg.seed)
        train, train_mask = pack_examples(
            train_rows, tokenizer, data_cfg.seq_len, "training split", generated_ids=ids
        )
        heldout, heldout_mask = pack_examples(
            heldout_rows, tokenizer, data_cfg.seq_len, "held-out split", generated_ids=ids
        )
    else:
        docs = load_documents(data_cfg.source, data_cfg.format, data_cfg.text_field)
        train_docs, heldout_docs = split_documents(docs, data_cfg.heldout_fraction, data_cfg.seed)
        train = pack_documents(train_docs, tokenizer, data_cfg.seq_len, what="training split")
        heldout = pack_documents(heldout_docs, tokenizer, data_cfg.seq_len, what="held-out split")
        train_mask = heldout_mask = None
    if data_cfg.max_train_sequences:
        train = PackedDataset(train.tokens[: data_cfg.max_train_sequences])
    if len(train) < global_batch:
        raise DataError(
            f"the training split packs into {len(train)} sequences of {data_cfg.seq_len} tokens, fewer "
            f"than one global batch ({global_batch}); add text, lower data.seq_len or shrink the batch."
        )
    n_eval = min(data_cfg.heldout_sequences, len(heldout)) // num_ranks * num_ranks
    if n_eval == 0:
        raise DataError(
            f"the held-out split packs into {len(heldout)} sequence(s), fewer than the {num_ranks} ranks "
            f"that evaluate it; raise data.heldout_fraction or lower data.seq_len."
        )
    heldout = PackedDataset(heldout.tokens[:n_eval])
    arrays = {"train": train, "heldout": heldout}
    if train_mask is not None:  # the masks are cut like the tokens
        arrays["train_mask"] = PackedDataset(train_mask[: len(train)])
        arrays["heldout_mask"] = PackedDataset(heldout_mask[:n_eval])

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, dataset in arrays.items():
        path = out_dir / f"{name}.npy"
        if path.exists():
            if PackedDataset.load(path).digest() != dataset.digest():
                raise DataError(
                    f"{path} was built from different data than the current data config / tokenizer; a "
                    f"resumed run must train on the same data (restore the original data settings or use "
                    f"a new run dir)."
                )
        else:
            dataset.save(path)
