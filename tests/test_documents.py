"""Packed documents kept apart (distill/documents.py): the boundary rule, and a packed row's logits equal
each of its documents run alone (sdpa on CPU, float64), for the student's forwards and the teacher's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from distill.config import ConfigError, DataConfig
from distill.data import pack_documents
from distill.documents import (
    document_position_ids,
    document_starts,
    flash_varlen_kwargs,
    isolate_documents,
    isolation_enabled,
)
from distill.models import load_causal_lm, load_tokenizer
from distill.teacher.actor import TeacherActor
from distill.teacher.pipeline import TeacherStage
from launch.train import check_pool_isolation

EOS = 2
DOCS = ["def f(x):\n    return x", "A short one.", "", "Lists are mutable sequences, typically homogeneous."]


def test_a_document_starts_at_the_window_start_and_right_after_each_eos():
    ids = torch.tensor(
        [
            [7, 8, EOS, 9, EOS, EOS, 5, 6],  # EOS closes its document; EOS EOS is a one-token document
            [EOS, 4, 4, 4, 4, 4, 4, EOS],  # a window may open with the EOS of an earlier document
        ]
    )
    starts = [[1, 0, 0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert document_starts(ids, EOS).int().tolist() == starts
    positions = document_position_ids(ids, EOS)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert positions.dtype == torch.int64
    # FlashAttention-2 varlen: the batch flattened, boundaries at every position 0, bounded by the row length
    varlen = flash_varlen_kwargs(positions)
    assert varlen["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 9, 16]
    assert varlen["cu_seq_lens_q"].dtype == torch.int32 and varlen["max_length_q"] == 8


def test_isolation_is_a_data_choice_and_off_for_completions():
    data = OmegaConf.structured(DataConfig)
    assert not data.document_isolation and not isolation_enabled(data)  # opt-in for now (README)
    on = OmegaConf.merge(data, {"document_isolation": True})
    assert isolation_enabled(on)
    assert not isolation_enabled(OmegaConf.merge(on, {"format": "completions"}))


def packed_row(model_dir: Path) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DOCS packed as the data pipeline packs them (text, EOS, text, EOS, ...) into one row, and each
    document alone with its EOS."""
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.eos_token_id == EOS
    alone = [torch.tensor(tokenizer(d, add_special_tokens=False)["input_ids"] + [EOS]) for d in DOCS]
    total = sum(len(d) for d in alone)
    row = torch.from_numpy(pack_documents(DOCS, tokenizer, total).tokens.astype(np.int64))
    assert row.shape == (1, total) and torch.equal(row[0], torch.cat(alone))
    return row, alone


@torch.no_grad()
def test_a_packed_rows_logits_equal_each_document_run_alone(tiny_student_dir: Path):
    model = load_causal_lm(tiny_student_dir, dtype=torch.float64, attn_implementation="sdpa", device="cpu")
    model.eval()
    row, alone = packed_row(tiny_student_dir)
    reference = torch.cat([model(input_ids=d[None]).logits[0] for d in alone])
    rows = torch.cat([row, row.flip(1)])  # a second row with other boundaries, in the same batch
    reference_flipped = torch.cat([model(input_ids=d[None]).logits[0] for d in document_split(rows[1])])

    across = model(input_ids=rows).logits
    assert (across[0] - reference).abs().max() > 1e-3  # without isolation, documents see each other

    isolate_documents(model, EOS)
    logits = model(input_ids=rows).logits
    torch.testing.assert_close(logits[0], reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(logits[1], reference_flipped, rtol=0, atol=1e-10)
    # the fused-loss path runs the decoder alone and applies the head itself
    hidden = model.get_decoder()(input_ids=rows).last_hidden_state
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits, rtol=0, atol=1e-10)
    # a caller that lays out attention itself (generation: a padding mask) is left alone
    padded = model(input_ids=rows, attention_mask=torch.ones_like(rows)).logits
    torch.testing.assert_close(padded, across, rtol=0, atol=1e-10)


def document_split(row: torch.Tensor) -> list[torch.Tensor]:
    """A row cut into its documents by the boundary rule, each run alone."""
    starts = document_starts(row[None], EOS)[0].nonzero().view(-1).tolist() + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


@torch.no_grad()
def test_the_teacher_scores_packed_rows_like_the_student_sees_them(tiny_teacher_dir: Path):
    """The teacher actor (whole model) and a 2-stage pipeline give each document's own log-probs."""
    row, alone = packed_row(tiny_teacher_dir)
    model = load_causal_lm(tiny_teacher_dir, dtype=torch.float64, attn_implementation="sdpa", device="cpu")
    model.eval()
    reference = torch.cat([torch.log_softmax(model(input_ids=d[None]).logits[0], -1) for d in alone])
    ids = row.numpy().astype(np.uint16)

    actor = TeacherActor(str(tiny_teacher_dir), dtype="float32", attn_implementation="sdpa")
    plain = torch.from_numpy(actor.full_log_probs(ids))[0].double()
    assert (plain - reference).abs().max() > 1e-3
    actor = TeacherActor(
        str(tiny_teacher_dir), dtype="float32", attn_implementation="sdpa", document_isolation=True
    )
    torch.testing.assert_close(
        torch.from_numpy(actor.full_log_probs(ids))[0].double(), reference, rtol=0, atol=2e-5
    )

    first = TeacherStage(str(tiny_teacher_dir), 0, 2, dtype="float32", document_isolation=True)
    last = TeacherStage(str(tiny_teacher_dir), 2, 3, dtype="float32", document_isolation=True)
    staged = last.full_log_probs(first.run({"input_ids": ids}))
    torch.testing.assert_close(torch.from_numpy(staged)[0].double(), reference, rtol=0, atol=2e-5)


def test_a_run_attaches_only_to_a_pool_with_its_own_isolation(tiny_teacher_pool):
    """`teacher.attach`: the pool's replicas report whether they keep documents apart (`document_eos`), and
    a run whose students do otherwise is refused before its ranks start."""
    infos = tiny_teacher_pool.info()  # real Ray actors, started without isolation
    assert [info["document_eos"] for info in infos] == [None, None]
    check_pool_isolation(infos, False, "test-pool")
    with pytest.raises(ConfigError, match=r"replica 0 was started with data.document_isolation=false"):
        check_pool_isolation(infos, True, "test-pool")
