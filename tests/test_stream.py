"""A real Ray teacher actor behind the prefetching stream client."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.models import load_causal_lm
from distill.stream import TeacherStream
from distill.stream.client import TeacherRaisedError, TeacherStreamError
from distill.teacher.actor import TeacherActor
from distill.teacher.pool import ActorReplica


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


class DelayedTeacher(TeacherActor):
    """The real teacher actor, answering top-k requests `delay_s` late: a slow teacher."""

    def __init__(self, model_dir: str, delay_s: float):
        super().__init__(model_dir, "float32", "sdpa")
        self.delay_s = delay_s

    def topk(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return super().topk(*args, **kwargs)


def overflowing_teacher(tiny_teacher_dir: Path, out: Path) -> Path:
    """The tiny teacher with its embeddings scaled by 1e6: hidden states far beyond float16's range, so a
    float16 reply with hidden states trips the actor's own overflow check (a ValueError in the teacher)."""
    shutil.copytree(tiny_teacher_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name] = weights[name] * 1e6
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_slow_reply_is_waited_for_and_a_teacher_error_is_told_apart(
    ray_runtime, tiny_teacher_dir, tmp_path
):
    """A reply slower than stream.timeout_s is waited for (with a log line) while its replica is alive, up
    to stream.max_wait_s; an error raised inside the teacher becomes TeacherRaisedError with the teacher's
    own message, not 'every replica died'."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's actor class travels by value
    slow = ray.remote(DelayedTeacher).options(num_cpus=0.5).remote(str(tiny_teacher_dir), 3.0)
    broken = (
        ray.remote(TeacherActor)
        .options(num_cpus=0.5)
        .remote(str(overflowing_teacher(tiny_teacher_dir, tmp_path / "overflowing")), "float32", "sdpa")
    )
    try:
        ray.get([slow.info.remote(), broken.info.remote()])  # loaded: what follows times the replies alone
        ids = np.arange(32, dtype=np.uint16).reshape(2, 16)
        waits = TeacherStream([ActorReplica(slow)], 4, 1, "float16", timeout_s=1, max_wait_s=30)
        [(_, out)] = list(waits.stream([ids], lambda b: b))
        assert out.values.shape == (2, 16, 4) and waits.stats.wait_s > 2.5  # answered after ~3 s
        gives_up = TeacherStream([ActorReplica(slow)], 4, 1, "float16", timeout_s=1, max_wait_s=1.5)
        with pytest.raises(TeacherStreamError, match=r"is alive but gave no answer .*\(stream.max_wait_s\)"):
            list(gives_up.stream([ids], lambda b: b))

        raises = TeacherStream([ActorReplica(broken)], 4, 1, "float16", timeout_s=60, hidden_layers=[0])
        with pytest.raises(
            TeacherRaisedError, match=r"the teacher raised ValueError on request 0: .*float16"
        ):
            list(raises.stream([ids], lambda b: b))
        assert raises.replicas  # the replica is not dropped as dead: it is alive and will fail again
    finally:
        ray.kill(slow)
        ray.kill(broken)
