"""Corpus loading (text / JSONL / Parquet), splitting, packing and per-rank sharding."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from distill.data import DataError, StepSampler, load_documents, pack_documents, split_documents


def test_reads_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x1", "x2"]))
    )
    pq.write_table(pa.table({"text": ["p1", "", "p2"]}), tmp_path / "c.parquet")
    docs = load_documents(str(tmp_path))
    assert docs == ["plain text document", "x1", "x2", "p1", "p2"]  # sorted files, empty rows dropped
    assert load_documents(str(tmp_path / "b.jsonl")) == ["x1", "x2"]
    assert load_documents(str(tmp_path), fmt="parquet") == ["p1", "p2"]


def test_missing_text_column_names_the_columns(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body\); set data.text_field"):
        load_documents(str(tmp_path / "b.jsonl"))


def test_builtin_corpus_is_real_prose():
    docs = load_documents("pydoc_topics")
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000


def test_split_is_deterministic_and_disjoint():
    docs = [f"document number {i}" for i in range(100)]
    train, heldout = split_documents(docs, 0.1, seed=0)
    assert len(heldout) == 10 and not set(train) & set(heldout)
    assert (train, heldout) == split_documents(list(reversed(docs)), 0.1, seed=0)  # order-independent
    assert split_documents(docs, 0.1, seed=1)[1] != heldout


def test_packing_separates_documents_with_eos(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    packed = pack_documents(["hello world", "second doc"] * 20, tok, seq_len=16)
    flat = packed.tokens.reshape(-1)
    first = tok("hello world", add_special_tokens=False)["input_ids"]
    assert list(flat[: len(first) + 1]) == [*first, tok.eos_token_id]
    assert packed.tokens.shape[1] == 16 and packed.tokens.dtype == np.uint16


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_sampler_shards_one_global_batch_across_ranks(world, accum):
    batches = {r: StepSampler(100, 3, accum, world, r, seed=7) for r in range(world)}
    for step in (0, 5, 8, 40):  # 40 is in a later epoch
        per_rank = [np.concatenate(batches[r].micro_batches(step)) for r in range(world)]
        everything = np.concatenate(per_rank)
        assert len(everything) == 12 and len(set(everything)) == 12  # disjoint, complete
        # the same global batch whatever the split: invariance of a step to world size and accumulation
        reference = np.concatenate(StepSampler(100, 3, 4, 1, 0, seed=7).micro_batches(step))
        assert sorted(everything) == sorted(reference)
    # the position is the step: a new sampler (a resumed job) gives the same batches
    again = StepSampler(100, 3, accum, world, 0, seed=7)
    assert all((a == b).all() for a, b in zip(again.micro_batches(13), batches[0].micro_batches(13)))


def test_sampler_needs_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(7, 4, 1, 2, 0, seed=0)
