"""Reading corpora, tokenising into Megatron shards, reading windows back, and the step sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from distill.data import DataError, StepSampler, load_documents, pack_documents
from distill.data import shards as shards_module
from distill.data.indexed import IndexedShard, ShardWriter
from distill.data.shards import TrainWindows, Windows, check_dataset, dataset_windows
from distill.data.tokenize import TokenizeSpec, in_heldout, plan_pieces, tokenize


def pydoc_jsonl(path: Path, copies: int = 1) -> list[str]:
    """Real prose (Python's documentation topics) as JSONL, `copies` times over; returns the documents."""
    docs = load_documents("pydoc_topics") * copies
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return docs


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- reading ----


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


def test_missing_text_field_names_file_line_and_fields(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(
        DataError, match=r"b.jsonl, line 2: no 'text' field \(has: body\); set data.text_field"
    ):
        load_documents(str(tmp_path / "b.jsonl"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet has no column 'text' \(columns: body\)"):
        load_documents(str(tmp_path / "c.parquet"))


def test_malformed_jsonl_and_corrupt_parquet_name_the_file(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(6)]
    lines[4] = '{"text": "unterminated'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 5: not valid JSON"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    with pytest.raises(DataError, match=r"bad.parquet is not a readable Parquet file"):
        load_documents(str(tmp_path / "bad.parquet"))


def test_builtin_corpus_is_real_prose():
    docs = load_documents("pydoc_topics")
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000


def test_heldout_split_is_a_deterministic_keyed_hash():
    docs = [f"document number {i}" for i in range(2000)]
    held = [d for d in docs if in_heldout(d, 0.1, seed=0)]
    assert 150 < len(held) < 250  # ~10%, decided per document
    assert held == [d for d in reversed(docs) if in_heldout(d, 0.1, seed=0)][::-1]  # order-independent
    assert held != [d for d in docs if in_heldout(d, 0.1, seed=1)]
    assert not any(in_heldout(d, 0.0, seed=0) for d in docs)


def test_packing_separates_documents_with_eos(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    packed = pack_documents(["hello world", "second doc"] * 20, tok, seq_len=16)
    flat = packed.tokens.reshape(-1)
    first = tok("hello world", add_special_tokens=False)["input_ids"]
    assert list(flat[: len(first) + 1]) == [*first, tok.eos_token_id]
    assert packed.tokens.shape[1] == 16 and packed.tokens.dtype == np.uint16


# ---- tokenising ----


def test_plan_cuts_jsonl_by_bytes_and_is_reproducible(tmp_path):
    pydoc_jsonl(tmp_path / "a.jsonl")
    size = (tmp_path / "a.jsonl").stat().st_size
    spec = TokenizeSpec(source=str(tmp_path), tokenizer="", shard_bytes=100_000)
    pieces = plan_pieces(spec)
    assert len(pieces) == -(-size // 100_000) and pieces[-1]["end"] == size
    assert pieces == plan_pieces(spec)


def test_tokenised_shards_equal_the_tokenizer_and_do_not_depend_on_workers(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "corpus"
    src.mkdir()
    docs = pydoc_jsonl(src / "a.jsonl")
    pq.write_table(pa.table({"text": docs[:20]}), src / "b.parquet", row_group_size=5)
    (src / "c.txt").write_text(docs[0])
    spec = TokenizeSpec(str(src), str(tiny_tokenizer_dir), heldout_fraction=0.1, shard_bytes=60_000)
    one = tokenize(spec, tmp_path / "one", workers=1)
    two = tokenize(spec, tmp_path / "two", workers=2)
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "two")  # byte-identical, any worker count
    assert len(one["shards"]["train"]) > 5 and one == two

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    every = docs + docs[:20] + [docs[0]]  # file order: a.jsonl, b.parquet, c.txt
    expected = {"train": [], "heldout": []}
    for doc in every:
        ids = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected["heldout" if in_heldout(doc, 0.1, 0) else "train"] += ids
    for split in ("train", "heldout"):
        got = np.concatenate(
            [IndexedShard(tmp_path / "one" / s["name"]).tokens for s in one["shards"][split]]
        )
        assert got.tolist() == expected[split]
        assert one["totals"][split]["tokens"] == len(expected[split])
    assert 0 < one["totals"]["heldout"]["documents"] < one["totals"]["train"]["documents"]
    check_dataset(tmp_path / "one", one["tokenizer"]["sha256"])  # complete, sizes match


def test_megatron_reads_our_shards_and_we_read_megatrons(tmp_path):
    import warnings

    warnings.filterwarnings("ignore", message=".*Apex.*")
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    docs = [np.arange(n, dtype=np.uint16) + n for n in (3, 7, 1, 12)]
    ours = ShardWriter(tmp_path / "ours", np.uint16)
    for d in docs:
        ours.add(d)
    ours.finish()
    theirs = IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == 4 and all((theirs[i] == d).all() for i, d in enumerate(docs))
    assert list(theirs.document_indices) == [0, 1, 2, 3, 4]

    import torch

    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    assert (tmp_path / "theirs.idx").read_bytes() == (tmp_path / "ours.idx").read_bytes()
    read = IndexedShard(tmp_path / "theirs")
    assert read.sequences == 4 and read.tokens.tolist() == np.concatenate(docs).tolist()


def test_a_changed_corpus_refuses_to_resume_into_the_same_output(tmp_path, tiny_tokenizer_dir):
    pydoc_jsonl(tmp_path / "a.jsonl")
    spec = TokenizeSpec(str(tmp_path / "a.jsonl"), str(tiny_tokenizer_dir), shard_bytes=200_000)
    tokenize(spec, tmp_path / "out")
    before = file_bytes(tmp_path / "out")
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DataError, match="other inputs or settings"):
        tokenize(spec, tmp_path / "out")
    assert file_bytes(tmp_path / "out") == before


# ---- reading windows ----


def test_windows_read_each_shards_tokens_in_order(tmp_path, monkeypatch):
    streams = [np.arange(100, dtype=np.uint16), np.arange(1000, 1050, dtype=np.uint16)]
    for i, stream in enumerate(streams):
        writer = ShardWriter(tmp_path / f"s{i}", np.uint16)
        writer.add(stream[:30])
        writer.add(stream[30:])
        writer.finish()
    monkeypatch.setattr(shards_module, "MAX_OPEN", 1)
    windows = Windows([tmp_path / "s0", tmp_path / "s1"], [100, 50], seq_len=16)
    assert len(windows) == 6 + 3  # each shard's last partial window is left out
    got = windows.read(np.array([7, 0, 6, 8]))
    assert got.tolist() == [
        list(range(1016, 1032)),
        list(range(16)),
        list(range(1000, 1016)),
        list(range(1032, 1048)),
    ]
    assert len(windows.shards._open) == 1  # at most MAX_OPEN shard files open
    with pytest.raises(IndexError):
        windows.read(np.array([9]))


def test_train_windows_route_global_indices_to_their_source(tmp_path, tiny_tokenizer_dir):
    """One source (read directly) and two (routed by offset) give each source's own windows."""
    pydoc_jsonl(tmp_path / "a.jsonl")
    tokenize(TokenizeSpec(str(tmp_path / "a.jsonl"), str(tiny_tokenizer_dir)), tmp_path / "out")
    full = dataset_windows(tmp_path / "out", "train", 64)
    for sources in ([{"path": str(tmp_path / "out")}], [{"path": str(tmp_path / "out"), "cap": 5}] * 2):
        (tmp_path / "run").mkdir(exist_ok=True)
        spec = {"seq_len": 64, "sources": sources, "digest": "x"}
        (tmp_path / "run" / "dataset.json").write_text(json.dumps(spec))
        train = TrainWindows(tmp_path / "run")
        idx = np.array([len(train) - 1, 0, 3, 0])
        local = idx - train.offsets[train.source_of(idx)]
        assert (train[idx] == full.read(local)).all() and train.target_mask(idx) is None
        with pytest.raises(IndexError):
            train[np.array([len(train)])]


def test_windows_of_a_truncated_or_other_dtype_shard(tmp_path):
    """A window past a shard file's end (a truncated .bin) is refused naming the file, not returned short;
    shards of two dtypes read into the first row's dtype, value for value."""
    for name, dtype, n in (("u16", np.uint16, 64), ("i32", np.int32, 64)):
        writer = ShardWriter(tmp_path / name, dtype)
        writer.add(np.arange(n, dtype=dtype) + (70000 if dtype == np.int32 else 0))
        writer.finish()
    windows = Windows([tmp_path / "u16", tmp_path / "i32"], [64, 64], seq_len=16)
    got = windows.read([5, 1])
    assert got.dtype == np.int32 and got.tolist() == [list(range(70016, 70032)), list(range(16, 32))]
    (tmp_path / "u16.bin").write_bytes((tmp_path / "u16.bin").read_bytes()[:100])  # 50 of 64 tokens left
    windows = Windows([tmp_path / "u16"], [64], seq_len=16)
    assert windows.read([2]).tolist() == [list(range(32, 48))]
    with pytest.raises(DataError, match=r"u16\.bin: window 3 is past the file's end .*truncated"):
        windows.read([3])


def test_dataset_windows_cap(tmp_path, tiny_tokenizer_dir):
    pydoc_jsonl(tmp_path / "a.jsonl")
    tokenize(TokenizeSpec(str(tmp_path / "a.jsonl"), str(tiny_tokenizer_dir)), tmp_path / "out")
    full = dataset_windows(tmp_path / "out", "train", 64)
    capped = dataset_windows(tmp_path / "out", "train", 64, cap=10)
    assert len(capped) == 10 < len(full)
    assert (capped.read(np.arange(10)) == full.read(np.arange(10))).all()


# ---- sampling ----


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_sampler_shards_one_global_batch_across_ranks(world, accum):
    batches = {r: StepSampler(96, 3, accum, world, r, seed=7) for r in range(world)}
    for step in (0, 5, 7, 40):  # 40 is in a later epoch
        per_rank = [np.concatenate(batches[r].micro_batches(step)) for r in range(world)]
        everything = np.concatenate(per_rank)
        assert len(everything) == 12 and len(set(everything)) == 12  # disjoint, complete
        # the same global batch whatever the split: invariance of a step to world size and accumulation
        reference = np.concatenate(StepSampler(96, 3, 4, 1, 0, seed=7).micro_batches(step))
        assert sorted(everything) == sorted(reference)
    # the position is the step: a new sampler (a resumed job) gives the same batches
    again = StepSampler(96, 3, accum, world, 0, seed=7)
    assert all((a == b).all() for a, b in zip(again.micro_batches(13), batches[0].micro_batches(13)))


def test_one_source_one_epoch_trains_every_sequence_exactly_once():
    sampler = StepSampler(1000, 5, 2, 4, 0, seed=3)  # global batch 40, 25 steps per epoch
    ranks = [StepSampler(1000, 5, 2, 4, r, seed=3) for r in range(4)]
    seen = np.concatenate([np.concatenate(s.micro_batches(step)) for step in range(25) for s in ranks])
    assert sorted(seen.tolist()) == list(range(1000))
    second = np.concatenate([sampler.global_batch_indices(step) for step in range(25, 50)])
    assert sorted(second.tolist()) == list(range(1000))  # the next epoch: again each once ...
    first = np.concatenate([sampler.global_batch_indices(step) for step in range(25)])
    assert (first != second).any()  # ... in another order


def test_blend_proportions_follow_the_weights_and_small_sources_cycle_epochs():
    sizes, weights = [5000, 40, 800], [0.5, 0.2, 0.3]
    sampler = StepSampler(sizes, 8, 2, 2, 0, seed=1, weights=weights)  # global batch 32
    for steps in (1, 7, 100, 1000):
        counts = sampler.source_counts(steps)
        assert counts.sum() == 32 * steps
        assert np.all(np.abs(counts - np.array(weights) * 32 * steps) < 1)  # within one window, always
    drawn = np.concatenate([sampler.global_batch_indices(step) for step in range(100)])
    per_source = np.bincount(np.searchsorted(sampler.offsets, drawn, side="right") - 1, minlength=3)
    assert per_source.tolist() == sampler.source_counts(100).tolist()
    small = drawn[(drawn >= 5000) & (drawn < 5040)] - 5000  # 640 draws of a 40-window source: 16 epochs
    assert np.bincount(small, minlength=40).tolist() == [16] * 40


@pytest.mark.parametrize("n", [2, 3, 1000, 32_000, 10**12])
def test_the_small_permutation_path_equals_the_array_path(n, monkeypatch):
    """A rank permutes a few dozen positions a step in plain Python integers (numpy's per-call cost would
    dominate); both paths must be the same permutation, value for value, or a resume across the size
    threshold would train other samples."""
    from distill.data import sampler

    positions = np.random.default_rng(n).integers(0, n, 40)
    monkeypatch.setattr(sampler, "SMALL", 10**9)
    small = sampler.permute(positions, n, key=12345)
    monkeypatch.setattr(sampler, "SMALL", -1)
    arrays = sampler.permute(positions, n, key=12345)
    assert small.dtype == arrays.dtype == np.int64 and (small == arrays).all()
    if n <= 1000:  # and a permutation of [0, n)
        monkeypatch.setattr(sampler, "SMALL", 10**9)
        assert sorted(sampler.permute(np.arange(n), n, key=3).tolist()) == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 255, 256, 257, 1023, 1025, 4097])
def test_the_permutation_is_a_bijection_for_every_n(n, monkeypatch):
    """Cycle walking restricts the Feistel network to [0, n) for any n, tiny, odd or a power of two, on
    both paths (plain Python integers and arrays), with any key."""
    from distill.data import sampler

    for key in (0, 7, 2**64 - 1):
        images = []
        for small in (10**9, -1):
            monkeypatch.setattr(sampler, "SMALL", small)
            images.append(sampler.permute(np.arange(n), n, key=key).tolist())
        assert images[0] == images[1] and sorted(images[0]) == list(range(n))


@pytest.mark.parametrize("n", [2**40, 2**40 + 1, 2**62 + 1])
def test_the_permutation_covers_huge_n_exactly(n, monkeypatch):
    """The domain is sized with integer arithmetic: a float log2 of 2^62 + 1 is 62, which would leave the
    top position out of the domain."""
    from distill.data import sampler

    positions = np.array([0, 1, n // 2, n - 2, n - 1], dtype=np.int64)
    images = []
    for small in (10**9, -1):
        monkeypatch.setattr(sampler, "SMALL", small)
        images.append(sampler.permute(positions, n, key=5).tolist())
    assert images[0] == images[1] and len(set(images[0])) == 5 and all(0 <= v < n for v in images[0])


def test_sampler_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(7, 4, 1, 2, 0, seed=0)
    with pytest.raises(ValueError, match="under one window per global batch"):
        StepSampler([100, 100], 2, 1, 1, 0, seed=0, weights=[0.9, 0.1])


def test_a_megatron_corpus_imports_without_retokenising(tmp_path, tiny_tokenizer_dir):
    """Two pairs written by megatron-core's own builder (preprocess_data.py's writer), one with EOD appended
    and one without, one document of two sequences: imported as is (EOS ensured), split by a keyed hash of
    the ids, byte-identical with 1 or 2 workers, readable as training windows; ids outside the given
    tokenizer's vocabulary are refused with the file named."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*Apex.*")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    eos = tok.eos_token_id
    texts = load_documents("pydoc_topics")[:60]
    corpus = tmp_path / "megatron"
    corpus.mkdir()
    expected = {"train": [], "heldout": []}
    for name, chunk, append_eod in (
        ("a_text_document", texts[:30], True),
        ("b_text_document", texts[30:], False),
    ):
        builder = IndexedDatasetBuilder(str(corpus / f"{name}.bin"), dtype=np.uint16)
        for i, text in enumerate(chunk):
            ids = tok(text, add_special_tokens=False)["input_ids"] + ([eos] if append_eod else [])
            stored = np.asarray(ids, dtype=np.uint16)
            halves = [ids[: len(ids) // 2], ids[len(ids) // 2 :]] if i == 3 else [ids]  # two sequences
            for part in halves:
                builder.add_item(torch.tensor(part, dtype=torch.int64))
            builder.end_document()
            split = "heldout" if in_heldout(stored, 0.1, 0) else "train"
            expected[split] += ids if append_eod else ids + [eos]
        builder.finalize(str(corpus / f"{name}.idx"))

    spec = TokenizeSpec(str(corpus), str(tiny_tokenizer_dir), heldout_fraction=0.1, shard_bytes=20_000)
    assert len(plan_pieces(spec)) > 2 and {p["kind"] for p in plan_pieces(spec)} == {"megatron"}
    one = tokenize(spec, tmp_path / "one", workers=1)
    assert tokenize(spec, tmp_path / "two", workers=2) == one
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "two")
    for split in ("train", "heldout"):
        got = np.concatenate(
            [IndexedShard(tmp_path / "one" / s["name"]).tokens for s in one["shards"][split]]
        )
        assert got.tolist() == expected[split]
    assert one["totals"]["heldout"]["documents"] > 0
    assert one["totals"]["train"]["documents"] + one["totals"]["heldout"]["documents"] == 60
    check_dataset(tmp_path / "one", one["tokenizer"]["sha256"])
    windows = dataset_windows(tmp_path / "one", "train", 32)
    assert (windows.read([0]).ravel() == np.asarray(expected["train"][:32])).all()

    bad = tmp_path / "bad"
    bad.mkdir()
    builder = IndexedDatasetBuilder(str(bad / "c.bin"), dtype=np.uint16)
    builder.add_item(torch.tensor([1, 2, 300]))  # the tiny tokenizer has 256 ids
    builder.end_document()
    builder.finalize(str(bad / "c.idx"))
    with pytest.raises(DataError, match="token id 300 is outside the vocabulary"):
        tokenize(TokenizeSpec(str(bad), str(tiny_tokenizer_dir)), tmp_path / "bad-out")
