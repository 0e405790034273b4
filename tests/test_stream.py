"""A real Ray teacher actor behind the prefetching stream client."""

from __future__ import annotations

import numpy as np
import torch

from distill.models import load_causal_lm
from distill.stream import TeacherStream


def test_stream_returns_the_teachers_topk_in_order_with_bounded_prefetch(tiny_teacher_pool, tiny_teacher_dir):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, size=(2, 16), dtype=np.uint16) for _ in range(7)]
    pulled = 0

    def source():
        nonlocal pulled
        for b in batches:
            pulled += 1
            yield b

    stream = TeacherStream(tiny_teacher_pool.actors, topk=8, prefetch=3, values_dtype="float16", timeout_s=60)
    model = load_causal_lm(tiny_teacher_dir, dtype="float32").eval()
    for served, (batch, out) in enumerate(stream.stream(source(), lambda b: b), start=1):
        assert pulled - served <= 3 - 1 + 1  # at most `prefetch` requests ahead of the consumer
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=torch.from_numpy(batch.astype(np.int64))).logits, -1)
        ref_values, ref_indices = log_p.topk(8, dim=-1)
        values, indices = out.tensors()
        assert out.values.dtype == np.float16 and out.indices.dtype == np.uint16
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values.float(), ref_values, atol=2e-3, rtol=1e-3)  # fp16 rounding
    assert served == 7 and stream.stats.requests == 7
    assert stream.stats.bytes == 7 * 2 * 16 * 8 * (2 + 2)


def test_bfloat16_payload_round_trips(tiny_teacher_pool):
    stream = TeacherStream(
        tiny_teacher_pool.actors, topk=4, prefetch=1, values_dtype="bfloat16", timeout_s=60
    )
    batch = np.arange(32, dtype=np.uint16).reshape(2, 16)
    ((_, out),) = list(stream.stream([batch], lambda b: b))
    values, _ = out.tensors()
    assert values.dtype == torch.bfloat16 and (values <= 0).all() and values.shape == (2, 16, 4)
