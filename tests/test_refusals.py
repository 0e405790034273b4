"""Nothing silently wrong (#18), through the CLI: every expected bad input ends with one `error: ...` line
that names the file or key (exit code 2, no traceback), before any model loads, and leaves an existing run
directory exactly as it was (every file hashed before and after).

- tokenizer identity: a student whose tokenizer has the teacher's size but another id mapping, or one more
  added special token, is refused for online KD, for a teacher cache and for generated data;
- run directories: a fresh run over a finished one, a resume that changes what is trained, a longer
  schedule or another batch split without `trainer.allow_changes`, a changed global batch; and the allowed
  changes themselves (a longer schedule; another split of the same global batch) resume correctly,
  keeping the run's record and its earlier export;
- bad files: a truncated or missing weight shard, weights of another architecture, a tokenizer that cannot
  load, plus our own ConfigError / DataError; `HYDRA_FULL_ERROR=1` shows the traceback.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_online import ROOT, exported_weights, metrics, run_module
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from distill.cache.manifest import FORMAT
from distill.cache.writer import CacheWriter
from distill.models import ModelConfigError
from distill.student.checkpoint import list_checkpoints
from distill.student.engine import lr_lambda
from launch.generate import identity, open_output

NO_RAY = {"RAY_ADDRESS": "127.0.0.1:9"}  # any ray.init would try (and fail) to join this: no actor may start


def tree(folder: Path) -> dict[str, str]:
    """Every file (sha256) and folder under `folder`: equal trees mean nothing was written or removed."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def train(tmp_path: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m launch.train` with Hydra's own output under tmp_path (never inside a run directory)."""
    hydra_dir = tmp_path / f"hydra-{time.time_ns()}"
    return run_module("launch.train", [*overrides, f"hydra.run.dir={hydra_dir}"], timeout=600, **env)


def tiny(teacher: Path, student: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "+experiment=tiny",
        f"teacher.model.name_or_path={teacher}",
        f"student.model.name_or_path={student}",
        f"run_dir={run_dir}",
        *extra,
    ]


def assert_refused(proc: subprocess.CompletedProcess, *named: str) -> str:
    """Exit code 2, no traceback, one `error:` line naming every string in `named`; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in named:
        assert name in errors[0], (name, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------ tokenizer identity


def swapped_ids(student: Path, out: Path) -> Path:
    """The student with two vocabulary entries' ids swapped: same size, same tokens, another mapping."""
    shutil.copytree(student, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (token for token, i in vocab.items() if i in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return out


def extra_special_token(student: Path, out: Path) -> Path:
    """The student's tokenizer plus one added special token; config.json's vocab_size (256) is unchanged,
    so the two models' vocabulary sizes still agree."""
    shutil.copytree(student, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 256
    return out


@pytest.fixture(scope="module")
def other_students(tiny_student_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("other-students")
    return {
        "mapping": swapped_ids(tiny_student_dir, root / "swapped"),
        "special": extra_special_token(tiny_student_dir, root / "special"),
    }


@pytest.mark.parametrize(
    "case, difference",
    [
        ("mapping", "token id 100 is"),
        ("special", "added token id 256 is absent for the teacher and '<|tool|>'"),
    ],
)
def test_online_kd_refuses_a_student_tokenizer_of_the_same_size_but_other_content(
    case, difference, other_students, tiny_teacher_dir, tmp_path
):
    student, run_dir = other_students[case], tmp_path / "run"
    proc = train(tmp_path, *tiny(tiny_teacher_dir, student, run_dir), **NO_RAY)
    line = assert_refused(proc, str(tiny_teacher_dir), str(student), difference, "not supported yet")
    assert "tokenizer" in line
    assert not run_dir.exists()  # refused before anything was written


def test_cached_kd_refuses_a_student_whose_tokenizer_is_not_the_caches(
    other_students, tiny_teacher_dir, tmp_path
):
    """teacher=cached: the cache keeps its teacher's tokenizer (written by the real CacheWriter); a student
    of the same vocabulary size with other ids is refused, naming both folders, before the manifest or any
    shard is read."""
    cache = tmp_path / "cache"
    CacheWriter(cache, {"format": FORMAT}, {}, tiny_teacher_dir)
    before, run_dir = tree(cache), tmp_path / "run"
    overrides = tiny(
        tiny_teacher_dir, other_students["mapping"], run_dir, "teacher=cached", f"cache.path={cache}"
    )
    proc = train(tmp_path, *overrides, **NO_RAY)
    assert_refused(proc, "cache tokenizer mismatch", str(cache / "teacher"), str(other_students["mapping"]))
    assert tree(cache) == before and not run_dir.exists()


def test_generated_data_refuses_a_student_whose_tokenizer_is_not_the_generators(
    other_students, tiny_teacher_dir, tmp_path
):
    """data.tokens=generated: generation.json (written by launch.generate's own code) names the generator;
    a student whose tokenizer differs only in an added special token is refused, naming both folders."""
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "generated"
    prompts.write_text('{"prompt": "What is a list?"}\n')
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        gcfg = compose(
            "generate",
            overrides=[
                "teacher=local",
                f"teacher.model.name_or_path={tiny_teacher_dir}",
                f"prompts={prompts}",
            ]
            + [f"out={out}"],
        )
    open_output(out, identity(gcfg, tiny_teacher_dir, prompts))
    student, run_dir = other_students["special"], tmp_path / "run"
    data = ["teacher.source=none", "data=completions", f"data.source={out}", "data.tokens=generated"]
    proc = train(tmp_path, *tiny(Path("/no/teacher/needed"), student, run_dir, *data), **NO_RAY)
    assert_refused(proc, "generator's tokenizer", str(tiny_teacher_dir), str(student), "added token id 256")
    assert not run_dir.exists()


# ----------------------------------------------------------------------------------------- run directories

# A finished run, cheap (no teacher, ZeRO-0, 2 ranks, 4 steps, checkpoints at 2 and 4).
RUN = [
    "teacher.source=none",
    "trainer=zero0",
    "trainer.max_steps=4",
    "trainer.checkpoint_every=2",
    "trainer.eval_every=100",
]


@pytest.fixture(scope="module")
def finished_run(tiny_student_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    proc = train(root, *tiny(Path("/no/teacher/needed"), tiny_student_dir, root / "run", *RUN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(root / "run" / "checkpoints")] == ["step-000002", "step-000004"]
    return root / "run"


def again(run_dir: Path, student: Path, *extra: str) -> list[str]:
    return tiny(Path("/no/teacher/needed"), student, run_dir, *RUN, *extra)


@pytest.mark.parametrize(
    "extra, named",
    [
        # a second, fresh run (another seed) given the finished run's directory
        (
            ["trainer.seed=1"],
            ["already holds a run", "checkpoints/step-000004", "trainer.resume=latest", "run_dir"],
        ),
        # resuming with changes to what is trained
        (
            ["trainer.resume=latest", "data.seed=1", "loss.temperature=2.0"],
            ["data.seed 0 -> 1", "loss.temperature 1.0 -> 2.0", "config.yaml", "run_dir=..."],
        ),
        # a longer schedule, not asked for
        (
            ["trainer.resume=latest", "trainer.max_steps=6"],
            ["trainer.max_steps 4 -> 6", "trainer.allow_changes="],
        ),
        # a shorter one, even when asked for
        (
            ["trainer.resume=auto", "trainer.max_steps=3", "trainer.allow_changes=[trainer.max_steps]"],
            ["can only grow", "trainer.stop_at_step=3"],
        ),
        # another global batch, even when asked for
        (
            [
                "trainer.resume=latest",
                "trainer.micro_batch_size=8",
                "trainer.allow_changes=[trainer.micro_batch_size]",
            ],
            ["global batch from 8 to 16", "trainer.micro_batch_size 4 -> 8"],
        ),
    ],
)
def test_a_run_directory_is_never_taken_over(extra, named, finished_run, tiny_student_dir, tmp_path):
    before = tree(finished_run)
    proc = train(tmp_path, *again(finished_run, tiny_student_dir, *extra))
    assert_refused(proc, *named)
    assert tree(finished_run) == before


def test_the_rank_count_of_a_zero2_run_stays(tiny_student_dir, tmp_path):
    """DeepSpeed cannot re-partition ZeRO-1/2/3 optimizer state over another number of ranks: a restart of a
    prepared ZeRO-2 run (the Slurm scripts' `launch.mode=prepare trainer.resume=auto`) with another rank
    count is refused even with the same global batch and trainer.allow_changes."""
    run_dir, student = tmp_path / "run", tiny_student_dir
    common = ["teacher.source=none", "launch.mode=prepare", "trainer.resume=auto"]
    assert train(tmp_path, *tiny(Path("/none"), student, run_dir, *common)).returncode == 0
    before = tree(run_dir)
    split = ["trainer.num_ranks=1", "trainer.micro_batch_size=8"]
    allow = "trainer.allow_changes=[trainer.num_ranks,trainer.micro_batch_size]"
    proc = train(tmp_path, *tiny(Path("/none"), student, run_dir, *common, *split, allow))
    assert_refused(proc, "trainer.num_ranks 2 -> 1", "ZeRO-2", "keep trainer.num_ranks=2")
    assert tree(run_dir) == before


def test_a_longer_schedule_continues_the_run_and_keeps_its_record(finished_run, tiny_student_dir, tmp_path):
    """trainer.max_steps 4 -> 6 with trainer.allow_changes: config.yaml and the step-4 export are kept
    (student-step-000004/), the change is recorded, steps 5-6 follow the schedule of 6 steps."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = tree(run_dir)
    overrides = again(run_dir, tiny_student_dir, "trainer.resume=latest", "trainer.max_steps=6")
    proc = train(tmp_path, *overrides, "trainer.allow_changes=[trainer.max_steps]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = tree(run_dir)
    assert after["config.yaml"] == before["config.yaml"]  # the run's record
    for rel, digest in before.items():  # the step-4 export, renamed, not replaced
        if rel.startswith("student/"):
            assert after[rel.replace("student/", "student-step-000004/", 1)] == digest
    assert after["summary-step-000004.json"] == before["summary.json"]
    assert OmegaConf.load(run_dir / "config-history" / "start-0001.yaml").trainer.max_steps == 6
    [line] = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert line["changes"]["trainer.max_steps"] == [4, 6] and line["resume_from"].endswith("step-000004")
    # the schedule rule: after the resumed step, the LR is the warmup + cosine curve of the new max_steps
    # (`train/lr` at step s is the rate set for step s + 1)
    lr = {r["step"]: r["train/lr"] for r in metrics(run_dir) if "train/lr" in r}
    for step in (5, 6):
        assert lr[step] == pytest.approx(3e-3 * lr_lambda(step, 1, 6, 0.1), rel=1e-9)
    assert [r["step"] for r in metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_another_split_of_the_same_global_batch_resumes_to_the_same_weights(
    finished_run, tiny_student_dir, tmp_path
):
    """2 ranks x 4 sequences to step 2, then 1 rank x 8 (ZeRO-0, same global batch of 8): the sampler
    draws each step's global batch from (seed, step, size) alone, so the result equals the finished
    2-rank run's."""
    run_dir = tmp_path / "run"
    first = train(tmp_path, *again(run_dir, tiny_student_dir, "trainer.stop_at_step=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    split = ["trainer.resume=latest", "trainer.num_ranks=1", "trainer.micro_batch_size=8"]
    allow = "trainer.allow_changes=[trainer.num_ranks,trainer.micro_batch_size]"
    second = train(tmp_path, *again(run_dir, tiny_student_dir, *split, allow))
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = exported_weights(finished_run), exported_weights(run_dir)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------- bad files


def truncated(model: Path, out: Path) -> tuple[Path, Path]:
    shutil.copytree(model, out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    return out, weights


def sharded_missing_one(model: Path, out: Path) -> tuple[Path, Path]:
    """The model saved in several shards with an index, one shard gone (an interrupted copy)."""
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(out, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    shards[1].unlink()
    return out, shards[1]


def other_architecture(model: Path, out: Path) -> tuple[Path, Path]:
    """A GPT-2 config.json over the Llama weights (e.g. files of two models mixed in one folder)."""
    shutil.copytree(model, out)
    GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4).save_pretrained(out)
    return out, out


def unloadable_tokenizer(model: Path, out: Path) -> tuple[Path, Path]:
    shutil.copytree(model, out)
    text = (out / "tokenizer.json").read_text()
    (out / "tokenizer.json").write_text(text[: len(text) // 2])
    return out, out


@pytest.mark.parametrize(
    "role, make, named",
    [
        ("teacher", truncated, ["is truncated", "holds", "header describes"]),
        ("teacher", sharded_missing_one, ["model.safetensors.index.json", "missing"]),
        ("teacher", other_architecture, ["GPT2LMHeadModel", "another architecture"]),
        ("student", unloadable_tokenizer, ["tokenizer", "cannot be loaded"]),
    ],
)
def test_a_broken_model_folder_is_refused_from_its_headers_before_any_actor_starts(
    role, make, named, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    folder, culprit = make(tiny_teacher_dir if role == "teacher" else tiny_student_dir, tmp_path / "broken")
    teacher, student = (folder, tiny_student_dir) if role == "teacher" else (tiny_teacher_dir, folder)
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    proc = train(tmp_path, *tiny(teacher, student, run_dir), **NO_RAY)
    assert_refused(proc, str(culprit), *named)
    assert time.perf_counter() - started < 120  # headers and sizes: seconds, plus the interpreter's start
    assert not run_dir.exists()


def test_a_passed_architecture_check_is_remembered_only_for_the_same_files(tiny_teacher_dir, tmp_path):
    """check_architecture remembers a folder that passed (every start of a run would otherwise import
    transformers' modelling code again), keyed by what it reads: the same config.json and headers skip the
    build; another config.json over the same weights is checked again and refused."""
    from distill.models import _architecture_marker, check_architecture, check_weight_files

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, folder)
    headers = check_weight_files(folder)
    check_architecture(folder, headers)
    assert _architecture_marker(folder / "config.json", headers).is_file()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]})
    )
    with pytest.raises(ModelConfigError, match=r"has shape .* config.json describes"):
        check_architecture(folder, check_weight_files(folder))


@pytest.mark.parametrize(
    "extra, named",
    [
        (["trainer.zero_stage=5"], ["trainer.zero_stage=5"]),  # ConfigError
        (["loss.divergence=nope"], ["loss:", "nope"]),  # a builder's ValueError, named by its config node
        (["trainer.allow_changes=[loss.temperature]"], ["trainer.allow_changes", "loss.temperature"]),
        (["data.source=/no/such/corpus.jsonl"], ["data.source", "/no/such/corpus.jsonl"]),  # DataError
    ],
)
def test_our_own_errors_are_one_line_without_traceback(
    extra, named, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    run_dir = tmp_path / "run"
    proc = train(tmp_path, *tiny(tiny_teacher_dir, tiny_student_dir, run_dir, *extra), **NO_RAY)
    assert_refused(proc, *named)


def test_hydra_full_error_shows_the_traceback(tiny_teacher_dir, tiny_student_dir, tmp_path):
    overrides = tiny(tiny_teacher_dir, tiny_student_dir, tmp_path / "run", "trainer.zero_stage=5")
    proc = train(tmp_path, *overrides, HYDRA_FULL_ERROR="1", **NO_RAY)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def bad_corpus(folder: Path, case: str) -> tuple[Path, list[str]]:
    """A corpus file a careful user still gets wrong, and what the error line must name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    if case == "malformed jsonl":
        path = folder / "corpus.jsonl"
        lines = [json.dumps({"text": f"document {i} " * 50}) for i in range(8)]
        lines[4] = '{"text": "a line cut short'
        path.write_text("\n".join(lines) + "\n")
        return path, [str(path), "line 5", "not valid JSON"]
    if case == "corrupt parquet":
        path = folder / "corpus.parquet"
        path.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
        return path, [str(path), "Parquet"]
    if case == "non-text column":
        path = folder / "corpus.parquet"
        pq.write_table(pa.table({"text": list(range(100))}), path)
        return path, [str(path), "column 'text'", "not text", "data.text_field"]
    path = folder / "corpus.jsonl"  # "empty": every document blank
    path.write_text("\n".join(json.dumps({"text": "   "}) for _ in range(5)) + "\n")
    return path, [str(path), "holds no text"]


@pytest.mark.parametrize("case", ["malformed jsonl", "corrupt parquet", "non-text column", "empty"])
def test_a_bad_corpus_is_one_line_naming_the_file(case, tiny_teacher_dir, tiny_student_dir, tmp_path):
    corpus, named = bad_corpus(tmp_path / "corpus", case)
    run_dir = tmp_path / "run"
    overrides = tiny(tiny_teacher_dir, tiny_student_dir, run_dir, f"data.source={corpus}")
    assert_refused(train(tmp_path, *overrides, **NO_RAY), *named)
    assert not (run_dir / "config.yaml").exists()  # refused before the run directory was written
    tokenised = run_module(
        "launch.tokenize", [f"source={corpus}", f"out={tmp_path / 'tokens'}", f"tokenizer={tiny_student_dir}"]
    )
    assert_refused(tokenised, *named)  # the tokeniser says the same


@pytest.mark.parametrize("module", ["launch.train", "launch.cache", "launch.generate", "launch.tokenize"])
def test_the_mains_survive_submitits_pickling(module):
    """Hydra multirun on Slurm (hydra/launcher=slurm) pickles each command's task function with
    cloudpickle to send it to the job; the error-reporting decorator must not make it unpicklable."""
    import importlib

    import cloudpickle

    task = importlib.import_module(module).main.__wrapped__  # what @hydra.main hands to the launcher
    assert cloudpickle.loads(cloudpickle.dumps(task)).__name__ == "main"
