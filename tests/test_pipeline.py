"""A teacher split into 2 and 3 pipeline stages, and into tensor-parallel groups of 2 ranks per stage (gloo),
gives the unsharded model's top-k (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from distill.models import load_causal_lm, tiny_llama
from distill.plan import hop_bytes_per_token, model_shape
from distill.teacher.pipeline import PipelineTeacher, split_layers
from distill.teacher.pool import TeacherPool, actor_name
from distill.teacher.sparsify import Sparsifier, request_seed, sparsify


def test_split_layers_is_contiguous_and_balanced():
    assert split_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert split_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 stages"):
        split_layers(3, 4)


@pytest.fixture(scope="module")
def tied_teacher_dir(tmp_path_factory, tiny_tokenizer_dir):
    return tiny_llama(
        tmp_path_factory.mktemp("tied"),
        num_layers=4,
        seed=3,
        tokenizer_dir=tiny_tokenizer_dir,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )


@pytest.mark.parametrize("which,stages", [("trained", 2), ("trained", 3), ("tied", 3)])
def test_pipeline_topk_equals_the_unsharded_model(
    stages, which, ray_runtime, tiny_teacher_dir, tied_teacher_dir
):
    model_dir = tiny_teacher_dir if which == "trained" else tied_teacher_dir
    ids = np.random.default_rng(0).integers(0, 256, size=(3, 24), dtype=np.uint16)
    model = load_causal_lm(model_dir, dtype="float32").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)

    teacher = PipelineTeacher.start(str(model_dir), stages, dtype="float32", cpus_per_stage=0.5)
    try:
        total = ray.get(teacher.info())["parameters"]
        head_copy = model.lm_head.weight.numel() if which == "tied" and stages > 1 else 0
        assert total == sum(p.numel() for p in model.parameters()) + head_copy  # each tensor on one stage
        out = ray.get(teacher.submit_topk(7, ids, 16, "float32", hidden_layers=[0, 2]))
        full = ray.get(teacher.submit_full_log_probs(ids))
        window = ray.get(teacher.submit_full_log_probs(ids[:, :17], 9))  # evaluation's positions 9..16
        spec = Sparsifier("topk_sample", 6, seed=1)  # the last stage draws, seeded by the request's ids
        sampled = [ray.get(teacher.submit_topk(8 + i, ids, 4, "float32", sparsifier=spec)) for i in range(2)]
    finally:
        teacher.shutdown()
    np.testing.assert_array_equal(sampled[0].indices, sampled[1].indices)
    np.testing.assert_array_equal(sampled[0].offset, sampled[1].offset)
    generator = torch.Generator().manual_seed(request_seed(ids, 1))
    log_p = torch.log_softmax(ref.logits, -1).reshape(-1, ref.logits.shape[-1])
    draws = sparsify(log_p, "topk_sample", 4, 6, generator)  # what the unsharded model would send
    same = (torch.from_numpy(sampled[0].indices.reshape(-1, 10).astype(np.int64)) == draws[1]).all(-1)
    assert same.float().mean() >= 0.95  # the draws agree unless a probability moved across one (1e-5)
    values = torch.from_numpy(sampled[0].values.reshape(-1, 10))
    torch.testing.assert_close(values[same], draws[0][same], rtol=0, atol=1e-5)
    assert_replies_match(out, full, window, ref, model_dir, stages)


def assert_replies_match(out, full, window, ref, model_dir, stages: int) -> None:
    """A replica's answers to the pipeline tests' requests (top-16 request 7 with layers 0 and 2, full
    log-probs, evaluation's window 9..16) against the unsharded fp32 model's outputs `ref`."""
    ref_values, ref_indices = torch.log_softmax(ref.logits, -1).topk(16, dim=-1)
    values, indices = out.tensors()
    assert out.request_id == 7
    # the capacity plan's hop bytes per token (distill/plan.py) are what the replica measured: fp32, 4 bytes
    tokens = ref.logits.shape[0] * ref.logits.shape[1]
    assert out.hop_bytes == (stages - 1) * tokens * hop_bytes_per_token(model_shape(model_dir), 4)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(full), torch.log_softmax(ref.logits, -1), rtol=0, atol=1e-5)
    ref_window = torch.log_softmax(ref.logits[:, 9:17], -1)
    torch.testing.assert_close(torch.tensor(window), ref_window, rtol=0, atol=1e-5)
    hidden = out.hidden_tensors()
    for layer in (0, 2):
        torch.testing.assert_close(hidden[layer], ref.hidden_states[layer + 1], rtol=0, atol=1e-5)


def test_activations_cross_stages_in_the_models_dtype(ray_runtime, tiny_teacher_dir):
    """A bfloat16 replica sends its activations between stages as bfloat16 (2 bytes per value, half of
    what the fp32 copies cost) and answers what the unsharded bfloat16 model answers; its evaluation
    replies are float16 (half of float32), within float16's rounding of the model's fp32 log-probs."""
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 24), dtype=np.uint16)
    model = load_causal_lm(tiny_teacher_dir, dtype="bfloat16").eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.float(), -1)
    ref_values, ref_indices = ref.topk(16, dim=-1)
    teacher = PipelineTeacher.start(str(tiny_teacher_dir), 2, dtype="bfloat16", cpus_per_stage=0.5)
    try:
        out = ray.get(teacher.submit_topk(0, ids, 16, "float32"))
        full = ray.get(teacher.submit_full_log_probs(ids))
    finally:
        teacher.shutdown()
    assert full.dtype == np.float16 and full.nbytes == ids.size * model.config.vocab_size * 2
    torch.testing.assert_close(torch.from_numpy(full).float(), ref, rtol=2**-10, atol=1e-5)
    assert out.hop_bytes == ids.size * hop_bytes_per_token(model_shape(tiny_teacher_dir), 2)
    values, indices = out.tensors()
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)


def test_online_run_with_a_two_stage_teacher(tiny_teacher_dir, tiny_student_dir, tmp_path):
    from test_online import metrics, run_train, tiny_overrides

    run_dir = tmp_path / "run"
    proc = run_train(
        tiny_overrides(
            tiny_teacher_dir,
            tiny_student_dir,
            run_dir,
            "teacher.stages=2",
            "trainer.max_steps=16",
            "trainer.eval_every=8",
            "trainer.lr=1e-2",
        )
    )
    assert proc.returncode == 0
    evals = [r for r in metrics(run_dir) if "eval/kl" in r]
    assert evals[-1]["eval/kl"] < 0.8 * evals[0]["eval/kl"]
    # one hop of fp32 activations (the tiny teacher's width 64) per token, logged with the run's metrics
    hops = [r["stream/hop_bytes_per_token"] for r in metrics(run_dir) if "stream/hop_bytes_per_token" in r]
    assert hops and all(h == 64 * 4 for h in hops)


def test_more_stages_than_layers_is_refused_before_compute(tiny_teacher_dir, tiny_student_dir, tmp_path):
    from test_validation import compose_cfg

    from distill.config import ConfigError
    from launch.train import prepare

    with pytest.raises(ConfigError, match="teacher.stages=4 exceeds the teacher's 3 layers"):
        prepare(compose_cfg(tiny_teacher_dir, tiny_student_dir, "teacher.stages=4"), tmp_path / "run")


def test_the_top_k_reply_is_made_a_chunk_of_positions_at_a_time():
    """`topk_log_probs` equals the top-k of the whole micro-batch's log-softmax, with the vocabulary-wide
    temporaries made a few positions at a time."""
    from distill.teacher import actor

    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(3, 50, 16, generator=g), torch.nn.Linear(16, 1000, bias=False)
    want_values, want_ids = torch.log_softmax(head(hidden).float(), -1).topk(8, -1)
    saved, actor.LOGITS_CHUNK_BYTES = actor.LOGITS_CHUNK_BYTES, 7 * 4 * 1000  # 7 positions per chunk
    try:
        values, ids = actor.topk_log_probs(hidden, head, 8)
    finally:
        actor.LOGITS_CHUNK_BYTES = saved
    assert values.shape == (3, 50, 8) and values.dtype == torch.float32
    torch.testing.assert_close(values, want_values, rtol=0, atol=1e-5)
    assert torch.equal(ids, want_ids)


CAPPED_SCRIPT = """
import resource, sys, torch
from distill.teacher import actor
actor.LOGITS_CHUNK_BYTES = int(sys.argv[1])
hidden, head = torch.randn(4, 1024, 16), torch.nn.Linear(16, 16384, bias=False)
actor.topk_log_probs(hidden[:, :8], head, 8)  # first-call allocations before the cap
mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 128 * 2**20, resource.RLIM_INFINITY))
try:
    values, _ = actor.topk_log_probs(hidden, head, 8)
    print("answered", tuple(values.shape))
except RuntimeError as error:  # the CPU allocator's 'can't allocate memory'
    print("refused", str(error).splitlines()[0])
"""


def test_the_top_k_reply_fits_a_memory_cap_that_the_whole_batch_does_not(tmp_path):
    """One top-k reply over 4 x 1024 positions of a 16,384-token vocabulary, in a fresh process whose address
    space is capped at 128 MiB above what it has mapped: 32 positions per chunk (2 MiB of logits) answer;
    the whole batch at once (what the reply did before: 256 MiB of fp32 logits, then as much again for the
    log-probs) cannot allocate."""
    from conftest import run_script

    assert run_script(CAPPED_SCRIPT, str(32 * 4 * 16384)) == "answered (4, 1024, 8)"
    assert run_script(CAPPED_SCRIPT, str(2**40)).startswith("refused")


# ---- tensor parallelism inside a stage (teacher.tensor_parallel; distill/teacher/tensor_parallel.py) ----

SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def replicated_parameters(model) -> int:
    """Parameters every tensor-parallel rank holds whole: all but the planned linear layers of the decoder."""
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-2] not in SHARDED)


@pytest.mark.parametrize("stages", [1, 2])
def test_tensor_parallel_topk_equals_the_unsharded_model(stages, ray_runtime, tiny_teacher_dir):
    """TP=2 x PP=1 and TP=2 x PP=2 (gloo on CPU, fp32): the unsharded model's top-k, full log-probs and
    hidden states; each rank holds half of every planned layer weight and only that."""
    ids = np.random.default_rng(0).integers(0, 256, size=(3, 24), dtype=np.uint16)
    model = load_causal_lm(tiny_teacher_dir, dtype="float32").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)

    teacher = PipelineTeacher.start(
        str(tiny_teacher_dir),
        stages,
        dtype="float32",
        cpus_per_stage=0.5,
        name=actor_name(f"tp2-pp{stages}", 0),  # as a pool names its replica 0
        tensor_parallel=2,
    )
    try:
        info = ray.get(teacher.info())
        out = ray.get(teacher.submit_topk(7, ids, 16, "float32", hidden_layers=[0, 2]))
        # a student rank finds the replica by name, its tensor parallelism from the actors' names
        (attached,) = TeacherPool.attach(f"tp2-pp{stages}", 1, stages).actors
        assert isinstance(attached, PipelineTeacher) and attached.tensor_parallel == 2
        full = ray.get(attached.submit_full_log_probs(ids))
        window = ray.get(attached.submit_full_log_probs(ids[:, :17], 9))  # evaluation's positions 9..16
        if stages > 1:
            with pytest.raises(ValueError, match="a replica of 2 pipeline stages cannot generate"):
                teacher.submit_generate([[1, 2]], [0], {})
    finally:
        teacher.shutdown()
    assert info["tensor_parallel"] == 2
    ranks = [rank for stage in info["stages"] for rank in stage["ranks"]]
    assert len({rank["pid"] for rank in ranks}) == 2 * stages  # one process per rank
    for stage in info["stages"]:
        assert stage["ranks"][0]["parameters"] == stage["ranks"][1]["parameters"]  # equal halves
    # every sharded weight once over the ranks, every replicated one (embeddings, norms, head) twice
    total = sum(p.numel() for p in model.parameters())
    assert info["parameters"] == total + replicated_parameters(model)
    assert_replies_match(out, full, window, ref, tiny_teacher_dir, stages)


def test_a_tensor_parallel_replica_generates_what_the_unsharded_model_generates(
    ray_runtime, tiny_teacher_dir
):
    """TP=2 x PP=1: greedy and sampled completions, and the top-k at every completion token, as
    `distill.teacher.generate` gives them on the unsharded model (both ranks draw the same tokens)."""
    from distill.teacher.generate import generate

    prompts, seeds = [[1, 5, 9, 33], [7, 8], [100, 101, 102, 103, 104, 105]], [11, 12, 13]
    model = load_causal_lm(tiny_teacher_dir, dtype="float32").eval()
    teacher = PipelineTeacher.start(
        str(tiny_teacher_dir), 1, dtype="float32", cpus_per_stage=0.5, name="tp2-generate", tensor_parallel=2
    )
    try:
        for temperature in (0.0, 0.8):
            sampling = {
                "max_new_tokens": 12,
                "temperature": temperature,
                "top_p": 0.9,
                "stop_ids": [2],
                "pad_id": 0,
            }
            got = ray.get(teacher.submit_generate(prompts, seeds, sampling, 4))
            want = generate(model, prompts, seeds, topk=4, **sampling)
            for g, w in zip(got, want, strict=True):
                assert g["completion_ids"] == w["completion_ids"] and g["finished"] == w["finished"]
                assert np.array_equal(g["topk_ids"], w["topk_ids"])
                np.testing.assert_allclose(g["topk_values"], w["topk_values"], rtol=0, atol=1e-5)
                np.testing.assert_allclose(g["token_logprob"], w["token_logprob"], rtol=0, atol=1e-5)
    finally:
        teacher.shutdown()


def test_a_tensor_parallel_that_does_not_split_the_model_is_refused_before_any_actor_starts(
    ray_runtime, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """The tiny teacher has 4 heads, 2 key/value heads, 128 MLP channels: TP=3 and TP=4 cannot split them,
    nor can 2 ranks x 2 stages run on 2 GPUs. Refused with the fix, before an actor or placement group."""
    from test_validation import compose_cfg

    from distill.config import ConfigError
    from distill.teacher.tensor_parallel import tensor_parallel_problem
    from launch.train import prepare

    groups, actors = len(ray.util.placement_group_table()), ray.util.list_named_actors()
    with pytest.raises(
        ValueError, match=r"tensor_parallel=3 does not divide the teacher's 4 attention heads, 2 "
    ):
        PipelineTeacher.start(str(tiny_teacher_dir), 1, dtype="float32", name="tp3", tensor_parallel=3)
    assert len(ray.util.placement_group_table()) == groups and ray.util.list_named_actors() == actors

    with pytest.raises(
        ConfigError, match=r"teacher.tensor_parallel=4 does not divide the teacher's 2 key/value"
    ):
        prepare(
            compose_cfg(tiny_teacher_dir, tiny_student_dir, "teacher.tensor_parallel=4"), tmp_path / "run"
        )
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    assert "set gpus_per_replica=4 (or 0: CPU)" in tensor_parallel_problem(
        config, 2, stages=2, gpus_per_replica=2
    )
    assert tensor_parallel_problem(config, 2, stages=2, gpus_per_replica=4) is None


def test_a_killed_tensor_parallel_rank_makes_its_replica_dead_and_the_stream_drops_it(
    ray_runtime, tiny_teacher_dir
):
    """kill -9 of one rank of a TP=2 x PP=2 replica: its stage's rank 0 ends itself at the next request, so
    the request fails with RayActorError like a dead replica's (no hang, not a teacher error, also through
    the next stage); the stream drops the replica and re-sends its requests to the other replica."""
    import os
    import signal
    import time

    from conftest import start_tiny_pool

    from distill.stream import TeacherStream

    doomed = PipelineTeacher.start(
        str(tiny_teacher_dir), 2, dtype="float32", cpus_per_stage=0.5, name="tp-kill", tensor_parallel=2
    )
    pool = start_tiny_pool(tiny_teacher_dir, "tp-kill-other", replicas=1, max_restarts=0)
    try:
        ranks = ray.get(doomed.info())["stages"][0]["ranks"]
        os.kill(ranks[1]["pid"], signal.SIGKILL)  # stage 0's rank 1
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(doomed.submit_topk(0, np.zeros((1, 8), dtype=np.uint16), 4, "float32"), timeout=120)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{ranks[0]['pid']}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{ranks[0]['pid']}")  # stage 0's rank 0 ended itself

        batches = [np.full((1, 8), i, dtype=np.uint16) for i in range(6)]
        other = pool.actors[0]
        stream = TeacherStream([doomed, other], topk=4, prefetch=2, values_dtype="float32", timeout_s=60)
        served = [out.request_id for _, out in stream.stream(batches, lambda b: b)]
        assert served == list(range(6)) and stream.replicas == [other]  # the dead one's requests re-sent
    finally:
        doomed.shutdown()
        pool.shutdown()
