"""A teacher split into 2 and 3 pipeline stages gives the unsharded model's top-k (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from distill.models import load_causal_lm, tiny_llama
from distill.teacher.pipeline import PipelineTeacher, split_layers


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
    ref_values, ref_indices = torch.log_softmax(ref.logits, -1).topk(16, dim=-1)

    teacher = PipelineTeacher.start(str(model_dir), stages, dtype="float32", cpus_per_stage=0.5)
    try:
        total = ray.get(teacher.info())["parameters"]
        head_copy = model.lm_head.weight.numel() if which == "tied" and stages > 1 else 0
        assert total == sum(p.numel() for p in model.parameters()) + head_copy  # each tensor on one stage
        out = ray.get(teacher.submit_topk(7, ids, 16, "float32", hidden_layers=[0, 2]))
        full = ray.get(teacher.submit_full_log_probs(ids))
    finally:
        teacher.shutdown()
    values, indices = out.tensors()
    assert out.request_id == 7
    assert out.hop_bytes == (stages - 1) * ids.size * model.config.hidden_size * 4  # fp32: 4 bytes/value
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(full), torch.log_softmax(ref.logits, -1), rtol=0, atol=1e-5)
    hidden = out.hidden_tensors()
    for layer in (0, 2):
        torch.testing.assert_close(hidden[layer], ref.hidden_states[layer + 1], rtol=0, atol=1e-5)


def test_activations_cross_stages_in_the_models_dtype(ray_runtime, tiny_teacher_dir):
    """A bfloat16 replica sends its activations between stages as bfloat16 (2 bytes per value, half of
    what the fp32 copies cost) and answers what the unsharded bfloat16 model answers."""
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 24), dtype=np.uint16)
    model = load_causal_lm(tiny_teacher_dir, dtype="bfloat16").eval()
    with torch.no_grad():
        ref_values, ref_indices = torch.log_softmax(
            model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.float(), -1
        ).topk(16, dim=-1)
    teacher = PipelineTeacher.start(str(tiny_teacher_dir), 2, dtype="bfloat16", cpus_per_stage=0.5)
    try:
        out = ray.get(teacher.submit_topk(0, ids, 16, "float32"))
    finally:
        teacher.shutdown()
    assert out.hop_bytes == ids.size * model.config.hidden_size * 2
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
    import subprocess
    import sys

    from test_online import ROOT

    def run(chunk_bytes: int) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", CAPPED_SCRIPT, str(chunk_bytes)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        return proc.stdout.strip() or proc.stderr[-2000:]

    assert run(32 * 4 * 16384) == "answered (4, 1024, 8)"
    assert run(2**40).startswith("refused")
