"""Hidden-state (feature) distillation on the online path: the teacher's hidden-state payload, the driver's
layer-map checks, and end-to-end runs (projector trained, checkpointed, resumed, never exported)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_online import exported_weights, metrics, run_train, tiny_overrides
from test_validation import compose_cfg
from transformers import AutoModelForCausalLM

from distill.config import ConfigError, load_run_config
from distill.losses import DistillationLoss
from distill.models import load_causal_lm
from distill.stream import TeacherStream
from distill.stream.client import TeacherRaisedError
from distill.student.checkpoint import _DS_SAFE_GLOBALS, latest, list_checkpoints
from distill.student.objective import StudentObjective, build_projector
from launch.train import prepare

TOPK = 16  # tiny_overrides' stream.topk
TEACHER_WIDTH = 64  # tiny teacher: hidden 64, 3 layers; tiny student: hidden 48, 2 layers
PROJECTOR_KEYS = {f"projector.proj.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}


# ----------------------------------------------------------------------------- teacher payload


def test_teacher_sends_the_requested_hidden_layers(tiny_teacher_pool, tiny_teacher_dir):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(2, 16), dtype=np.uint16)
    model = load_causal_lm(tiny_teacher_dir, dtype="float32").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(batch.astype(np.int64)), output_hidden_states=True)

    stream = TeacherStream(
        tiny_teacher_pool.actors,
        topk=8,
        prefetch=1,
        values_dtype="float16",
        timeout_s=60,
        hidden_layers=[2, 0],
    )
    ((_, out),) = list(stream.stream([batch], lambda b: b))
    assert out.hidden.dtype == np.float16 and out.hidden.shape == (2, 2, 16, TEACHER_WIDTH)
    assert out.hidden_layers == [2, 0]
    hidden = out.hidden_tensors()
    assert sorted(hidden) == [0, 2]
    for layer in (0, 2):  # layer j = output of decoder layer j = hidden_states[j + 1]
        assert hidden[layer].dtype == torch.float32
        torch.testing.assert_close(hidden[layer], ref.hidden_states[layer + 1], atol=2e-3, rtol=1e-3)
        assert not torch.allclose(hidden[layer], ref.hidden_states[layer], atol=1e-2)
    _, indices = out.tensors()  # the top-k part is unchanged by the extra payload
    assert torch.equal(indices, ref.logits.topk(8, dim=-1).indices)
    tokens = 2 * 16
    assert stream.stats.bytes == tokens * (8 * (2 + 2) + 2 * TEACHER_WIDTH * 2)

    bf16 = TeacherStream(
        tiny_teacher_pool.actors, topk=4, prefetch=1, values_dtype="bfloat16", timeout_s=60, hidden_layers=[1]
    )
    ((_, out),) = list(bf16.stream([batch], lambda b: b))
    assert out.hidden.dtype == np.uint16  # bfloat16 bits
    torch.testing.assert_close(out.hidden_tensors()[1], ref.hidden_states[2], atol=3e-2, rtol=1e-2)

    plain = TeacherStream(tiny_teacher_pool.actors, topk=4, prefetch=1, values_dtype="float16", timeout_s=60)
    ((_, out),) = list(plain.stream([batch], lambda b: b))
    assert out.hidden is None and out.hidden_tensors() == {} and out.nbytes == tokens * 4 * (2 + 2)

    bad = TeacherStream(
        tiny_teacher_pool.actors, topk=4, prefetch=1, values_dtype="float16", timeout_s=60, hidden_layers=[3]
    )
    # the teacher's own error, told apart from a dead replica (the run stops with it on every rank)
    with pytest.raises(TeacherRaisedError, match=r"ValueError.*teacher layer 3 requested.*\(valid: 0\.\.2\)"):
        list(bad.stream([batch], lambda b: b))


# ----------------------------------------------------------------------------- checks before compute


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["features.layer_map='0:0,2:1'"], r"student layer 2 out of range.*2 layers \(valid: 0\.\.1\)"),
        (
            ["features.layer_map='0:0,1:3'"],
            r"teacher layer 3, but the teacher has 3 layers \(valid: 0\.\.2\)",
        ),
        (["features=mse_2i1"], r"'2i\+1'.*maps to teacher layer 3.*\(valid: 0\.\.2\)"),  # needs 4 layers
        (["features.layer_map=[0,-1]"], r"features.layer_map=\[0, -1\].*layer index"),
        (["features.layer_map=2i", "features.loss=l1"], r"features.loss='l1' is not supported"),
        (["features.layer_map=2i", "features.weight=-1"], r"features.weight=-1.0 must be >= 0"),
    ],
    ids=["student-index", "teacher-index", "rule", "negative", "loss", "weight"],
)
def test_bad_feature_config_fails_before_compute(
    overrides, message, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        prepare(compose_cfg(tiny_teacher_dir, tiny_student_dir, *overrides), run_dir)
    assert not run_dir.exists()  # nothing prepared, no data tokenised


def test_good_layer_maps_prepare(tiny_teacher_dir, tiny_student_dir, tmp_path):
    cfg = compose_cfg(tiny_teacher_dir, tiny_student_dir, "features=mse_2i1", "features.layer_map={0:0,1:2}")
    prepare(cfg, tmp_path / "run")
    projector = build_projector(
        load_run_config(tmp_path / "run").features, str(tiny_student_dir), str(tiny_teacher_dir)
    )
    assert projector.layer_map == {0: 0, 1: 2}
    assert projector.proj["1"].weight.shape == (TEACHER_WIDTH, 48)


# ----------------------------------------------------------------------------- the objective


def test_objective_adds_the_feature_loss_on_both_paths(tiny_teacher_dir, tiny_student_dir):
    """Fused (decoder -> chunked LM-head loss) and unfused (full logits) give the same loss and gradients,
    and the feature term is the projector's loss on the student's hidden_states[i + 1]."""
    torch.manual_seed(0)
    student_dir, teacher_dir = str(tiny_student_dir), str(tiny_teacher_dir)
    features = compose_cfg(
        tiny_teacher_dir, tiny_student_dir, "features=mse_2i1", "features.layer_map=2i"
    ).features
    ids = torch.randint(0, 256, (2, 12))
    values, indices = torch.log_softmax(torch.randn(2, 12, 256), -1).topk(8, dim=-1)
    teacher_hidden = {0: torch.randn(2, 12, TEACHER_WIDTH), 2: torch.randn(2, 12, TEACHER_WIDTH)}
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, -3:] = False
    args = (ids, values, indices, None, mask, 30.0, 0)

    results = {}
    for fused in (True, False):
        model = load_causal_lm(tiny_student_dir, dtype="float32")
        objective = StudentObjective(
            model,
            DistillationLoss(),
            fused=fused,
            projector=build_projector(features, student_dir, teacher_dir),
        )
        assert objective.fused == fused and objective.teacher_layers == [0, 2]
        loss, sums = objective(*args, teacher_hidden)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in objective.parameters()])
        results[fused] = loss, sums, grads
        assert set(sums) >= {"kd_sum", "feature_sum", "feature/0->0_sum", "feature/1->2_sum", "tokens"}
        assert sums["tokens"] == mask.sum().item()  # counted once, not once per loss

        kd_only = StudentObjective(model, DistillationLoss(), fused=fused)
        with torch.no_grad():
            kd_loss, _ = kd_only(*args)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            want = objective.projector({0: hidden[1], 1: hidden[2]}, teacher_hidden, mask, 30.0)
        torch.testing.assert_close(loss.detach(), kd_loss + want.loss)
        assert sums["feature_sum"] == pytest.approx(want.metrics["feature_sum"], rel=1e-5)
        assert objective.projector.proj["0"].weight.grad.abs().sum() > 0

    (fused_loss, fused_sums, fused_grads), (loss, sums, grads) = results[True], results[False]
    torch.testing.assert_close(fused_loss, loss)
    assert fused_sums == pytest.approx(sums, rel=1e-5)
    torch.testing.assert_close(fused_grads, grads, rtol=1e-4, atol=1e-6)

    with pytest.raises(ValueError, match="teacher's hidden states"):
        objective(*args)


# ----------------------------------------------------------------------------- end to end


def model_states(ckpt, stage: int = 2) -> dict:
    """DeepSpeed's model-states file (ZeRO-3: rank 0's, whose tensors are empty placeholders)."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(_DS_SAFE_GLOBALS):
        return torch.load(ckpt / "ds" / name, map_location="cpu", weights_only=True)


# the ZeRO-2 run: the rule 2i on 2 -> 3 layers ({0: 0, 1: 2}), 8 steps, a checkpoint every 2
ZERO2_MSE = [
    "trainer=zero2",
    "features=mse_2i1",
    "features.layer_map=2i",
    "trainer.eval_every=100",
    "trainer.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def zero2_mse_run(attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """One uninterrupted ZeRO-2 feature run: checked end to end, and the reference the resumed run must
    reproduce. (run dir, process)"""
    run_dir = tmp_path_factory.mktemp("features") / "zero2"
    overrides = tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *ZERO2_MSE, *attached_teacher)
    return run_dir, run_train(overrides)


@pytest.mark.parametrize(
    ("stage", "features"),
    [
        (2, ZERO2_MSE),  # zero2_mse_run
        (
            3,
            [
                "trainer=zero3",
                "features=mse_2i1",
                "features.layer_map='0:0,1:2'",
                "features.loss=cosine",
                "features.weight=2.0",
                "trainer.eval_every=100",
            ],
        ),
    ],
    ids=["zero2-mse", "zero3-cosine"],
)
def test_feature_distillation_end_to_end(
    stage, features, request, attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """The runs use the session's teacher pool (attached_teacher): its actors send the hidden states."""
    if stage == 2:
        run_dir, proc = request.getfixturevalue("zero2_mse_run")
    else:
        run_dir = tmp_path / f"zero{stage}"
        proc = run_train(
            tiny_overrides(tiny_teacher_dir, tiny_student_dir, run_dir, *features, *attached_teacher)
        )
    assert proc.returncode == 0
    assert "cannot be detected" not in proc.stderr  # ZeRO-3 finds every tensor of the objective's outputs

    cfg = load_run_config(run_dir)
    train = [r for r in metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    feature = [r["train/feature"] for r in train]
    assert all(np.isfinite(feature)) and feature[-1] < 0.85 * feature[0]  # the projection learns
    for r in train:  # per mapped layer, and the total loss is KD + weight * feature (one normaliser)
        assert r["train/feature"] == pytest.approx((r["train/feature/0->0"] + r["train/feature/1->2"]) / 2)
        assert r["train/loss"] == pytest.approx(
            r["train/kd"] + cfg.features.weight * r["train/feature"], rel=1e-5
        )

    # the teacher's two hidden layers ride the stream: fp16 values + uint16 ids, plus 2 x 64 fp16 per token
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bytes_per_token"] == TOPK * (2 + 2) + 2 * TEACHER_WIDTH * 2

    # the exported student is the student alone: same tensors as the initial folder, reloadable
    exported = exported_weights(run_dir)
    assert set(exported) == set(load_file(str(tiny_student_dir / "model.safetensors")))
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "student", dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 2

    # the DeepSpeed checkpoint holds the projector, among the parameters of the one optimizer
    states = model_states(latest(run_dir / "checkpoints"), stage)
    assert PROJECTOR_KEYS <= set(states["module"])
    optimized = {k: tuple(v) for group in states["param_shapes"] for k, v in group.items()}
    assert optimized["projector.proj.1.weight"] == (TEACHER_WIDTH, 48)
    assert PROJECTOR_KEYS <= set(optimized)
    if stage == 2:  # ZeRO-3 keeps the values in its partitioned files, not in the model states
        initial = build_projector(
            cfg.features, str(tiny_student_dir), str(tiny_teacher_dir), seed=cfg.trainer.seed
        )
        for key, value in initial.state_dict().items():
            saved = states["module"][f"projector.{key}"]
            assert saved.shape == value.shape
            assert not torch.allclose(saved.float(), value, atol=1e-4), f"{key} was not trained"


def test_resume_with_features_reproduces_an_uninterrupted_run(
    zero2_mse_run, attached_teacher, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """Stopped at step 3 of 8 and resumed: the weights, feature losses and trained projector of
    `zero2_mse_run`, the same settings trained without a break."""
    straight, straight_proc = zero2_mse_run
    assert straight_proc.returncode == 0
    resumed = tmp_path / "resumed"
    common = [*ZERO2_MSE, *attached_teacher]
    first = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, resumed, *common, "trainer.stop_at_step=3")
    )
    assert first.returncode == 0
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == ["step-000002", "step-000003"]
    second = run_train(
        tiny_overrides(tiny_teacher_dir, tiny_student_dir, resumed, *common, "trainer.resume=latest")
    )
    assert second.returncode == 0 and "resumed from" in second.stdout + second.stderr

    a, b = exported_weights(straight), exported_weights(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    straight_feature = [r["train/feature"] for r in metrics(straight) if "train/loss" in r]
    resumed_feature = [r["train/feature"] for r in metrics(resumed) if "train/loss" in r]
    assert len(resumed_feature) == 8 and resumed_feature == pytest.approx(straight_feature, rel=1e-5)
    projector_a = model_states(latest(straight / "checkpoints"))["module"]
    projector_b = model_states(latest(resumed / "checkpoints"))["module"]
    for key in PROJECTOR_KEYS:
        torch.testing.assert_close(projector_b[key], projector_a[key], rtol=0, atol=1e-6, msg=key)
