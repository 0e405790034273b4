"""Bad input fails with a clear message before any model loads or any compute starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_online import run_module

from distill.config import ConfigError
from distill.data import DataError
from distill.models import ModelConfigError, tiny_llama, tiny_tokenizer
from launch.train import prepare

ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(teacher: Path, student: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "teacher=local",
                f"teacher.model.name_or_path={teacher}",
                "student=local",
                f"student.model.name_or_path={student}",
                "logger=none",
                "data.seq_len=32",
                "data.heldout_sequences=4",
                *overrides,
            ],
        )


@pytest.fixture
def check(tiny_teacher_dir, tiny_student_dir, tmp_path):
    """prepare() on the tiny models with extra overrides; returns the run dir it would use."""

    def _check(*overrides: str, teacher=tiny_teacher_dir, student=tiny_student_dir):
        run_dir = tmp_path / "run"
        prepare(compose_cfg(teacher, student, *overrides), run_dir)
        return run_dir

    return _check


def test_good_config_prepares_the_run_directory(check):
    run_dir = check()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data" / "dataset.json").is_file()


def test_missing_model_folder(check, tmp_path):
    with pytest.raises(ModelConfigError, match="no such folder"):
        check(teacher=tmp_path / "no-such-model")


def test_unreadable_model_folder(check, tmp_path):
    folder = tmp_path / "half-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelConfigError, match="weights"):
        check(student=folder)


def test_vocab_mismatch_names_both_sizes(check, tmp_path):
    other_tok = tiny_tokenizer(tmp_path / "tok300", vocab_size=300)
    other = tiny_llama(tmp_path / "student300", vocab_size=300, tokenizer_dir=other_tok)
    with pytest.raises(ConfigError, match=r"teacher vocabulary \(256 tokens.*student's \(300 tokens"):
        check(student=other)


def test_topk_larger_than_vocab(check):
    with pytest.raises(ConfigError, match=r"stream.topk=1000 exceeds the teacher vocabulary \(256\)"):
        check("stream.topk=1000")


def test_zero_stage_out_of_range(check):
    with pytest.raises(ConfigError, match="zero_stage=5 is not a ZeRO stage"):
        check("trainer.zero_stage=5")


def test_prefetch_below_one(check):
    with pytest.raises(ConfigError, match="stream.prefetch=0 must be >= 1"):
        check("stream.prefetch=0")


def test_empty_corpus(check, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("  \n\n")
    with pytest.raises(DataError, match="holds no text"):
        check(f"data.source={corpus}")


def test_corpus_shorter_than_one_sequence(check, tmp_path):
    corpus = tmp_path / "short"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"tiny {i}")
    with pytest.raises(DataError, match="fewer than one sequence of data.seq_len=32"):
        check(f"data.source={corpus}")


def test_resume_without_checkpoint(check):
    with pytest.raises(ConfigError, match="trainer.resume=latest but .* holds no checkpoint"):
        check("trainer.resume=latest")


def test_unknown_loss_argument_value(check):
    with pytest.raises(ValueError, match="divergence"):
        check("loss.divergence=not_a_divergence")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("launch.train", list(args), timeout=120)


def test_cli_rejects_unknown_key_and_wrong_type_before_loading_anything():
    unknown = cli("trainer.zero_stag=2")
    assert unknown.returncode != 0 and "zero_stag" in unknown.stderr
    wrong_type = cli("trainer.zero_stage=two")
    assert wrong_type.returncode != 0 and "zero_stage" in wrong_type.stderr


def test_cli_prints_the_composed_config():
    shown = cli("trainer=zero3", "loss.temperature=2.0", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert "zero_stage: 3" in shown.stdout and "temperature: 2.0" in shown.stdout


def test_a_curriculum_is_refused_by_the_slurm_prepare_step_before_compute(tmp_path):
    """The Slurm scripts prepare with launch.mode=prepare; a curriculum needs the local driver."""
    proc = cli("launch.mode=prepare", f"run_dir={tmp_path / 'c'}", "+curriculum=[{name:a,max_steps:2}]")
    assert proc.returncode != 0 and "a curriculum runs with the local driver" in proc.stderr
    assert not (tmp_path / "c").exists()
