"""Tests for distill.models: real tiny models and the real SmolLM2 teacher, no mocks."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.models import (
    SMOLLM2_NAME,
    ModelConfigError,
    _build_once,
    load_causal_lm,
    load_smollm2_gguf,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_dtype,
    resolve_model,
    smollm2_folder,
    smollm2_gguf_path,
    student_from_teacher,
    tiny_llama,
    tiny_tokenizer,
    vocab_size,
)

TEXT = "Distillation moves knowledge from a teacher to a student: $x = `f(y)`\tdone.\n"


def _logits(folder: Path, text: str = TEXT) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


# ---------------------------------------------------------------------------------------------------------
# Tiny tokenizer and models
# ---------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_round_trips_and_is_deterministic(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tokenizer) == 256
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|pad|>",
    )
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    ids = tokenizer(TEXT).input_ids
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT)  # BPE merges were learned, not just bytes
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"

    again = tiny_tokenizer(tmp_path / "again", vocab_size=256)
    assert (again / "tokenizer.json").read_text() == (tiny_tokenizer_dir / "tokenizer.json").read_text()


def test_tiny_tokenizer_covers_all_bytes_when_large_enough(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path, vocab_size=600))
    assert len(tokenizer) == 600
    text = "naïve café — 日本語 ✓"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_tiny_tokenizer_custom_corpus_and_too_small_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="below the 132 base tokens"):
        tiny_tokenizer(tmp_path / "small", vocab_size=100)
    with pytest.raises(ValueError, match="corpus too small"):
        tiny_tokenizer(tmp_path / "tiny-corpus", vocab_size=256, corpus=["ab ab"])


def test_tiny_llama_is_seeded_and_reloads_with_identical_logits(
    tiny_teacher_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    config = json.loads((tiny_teacher_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 3, 256)
    assert (tiny_teacher_dir / "model.safetensors").is_file()
    assert not list(tiny_teacher_dir.glob("*.bin"))
    assert vocab_size(tiny_teacher_dir) == len(load_tokenizer(tiny_teacher_dir)) == 256

    first = tiny_llama(tmp_path / "first", num_layers=3, seed=1, tokenizer_dir=tiny_tokenizer_dir)
    rebuilt = tiny_llama(tmp_path / "same", num_layers=3, seed=1, tokenizer_dir=tiny_tokenizer_dir)
    other_seed = tiny_llama(tmp_path / "other", num_layers=3, seed=7, tokenizer_dir=tiny_tokenizer_dir)
    reference = _logits(first)
    assert reference.shape[-1] == 256
    assert torch.equal(_logits(rebuilt), reference)
    assert not torch.allclose(_logits(other_seed), reference)

    model = load_causal_lm(first, device="cpu").eval()
    tokenizer = load_tokenizer(first)
    with torch.no_grad():
        assert torch.equal(model(**tokenizer(TEXT, return_tensors="pt")).logits, reference)


def test_tiny_llama_without_tokenizer_dir_builds_its_own(tmp_path: Path) -> None:
    folder = tiny_llama(tmp_path / "m", vocab_size=300, hidden_size=32, num_layers=1)
    assert vocab_size(folder) == len(load_tokenizer(folder)) == 300
    assert _logits(folder).shape[-1] == 300


def test_tiny_llama_refuses_vocab_size_unlike_its_tokenizer(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=300 but the tokenizer .* has 256"):
        tiny_llama(tmp_path, vocab_size=300, tokenizer_dir=tiny_tokenizer_dir)


def test_teacher_and_student_fixtures_share_a_vocabulary(
    tiny_teacher_dir: Path, tiny_student_dir: Path
) -> None:
    assert vocab_size(tiny_teacher_dir) == vocab_size(tiny_student_dir)
    tokenizer_file = "tokenizer.json"
    assert (tiny_teacher_dir / tokenizer_file).read_text() == (tiny_student_dir / tokenizer_file).read_text()
    assert json.loads((tiny_student_dir / "config.json").read_text())["hidden_size"] == 48


# ---------------------------------------------------------------------------------------------------------
# Resolving and loading
# ---------------------------------------------------------------------------------------------------------


def test_resolve_model_accepts_a_complete_folder(tiny_teacher_dir: Path) -> None:
    assert resolve_model(str(tiny_teacher_dir)) == tiny_teacher_dir


def test_resolve_model_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"no-such-model.*no such folder.*builtin name"):
        resolve_model(str(tmp_path / "no-such-model"))


def test_resolve_model_file_instead_of_folder(tiny_teacher_dir: Path) -> None:
    with pytest.raises(ModelConfigError, match="is a file, not a folder"):
        resolve_model(str(tiny_teacher_dir / "config.json"))


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", r"missing config\.json; fix: point at a complete folder"),
        ("model.safetensors", r"missing weights \(\*\.safetensors or pytorch_model\*\.bin\)"),
        ("tokenizer.json", r"missing a tokenizer \(one of tokenizer\.json"),
    ],
)
def test_resolve_model_incomplete_folder(
    tiny_teacher_dir: Path, tmp_path: Path, remove: str, message: str
) -> None:
    folder = tmp_path / "incomplete"
    shutil.copytree(tiny_teacher_dir, folder)
    (folder / remove).unlink()
    with pytest.raises(ModelConfigError, match=message) as info:
        resolve_model(str(folder))
    assert str(folder) in str(info.value)


def test_resolve_model_unparsable_config(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_teacher_dir, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="config.json is unreadable"):
        resolve_model(folder)


def test_dtype_and_attention_choices() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(ModelConfigError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", cpu)
    assert resolve_attn_implementation("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation("auto", cuda, torch.float32) == "sdpa"
    assert resolve_attn_implementation("eager", cuda, torch.bfloat16) == "eager"


def test_load_causal_lm_honours_dtype_and_attention(tiny_teacher_dir: Path) -> None:
    model = load_causal_lm(tiny_teacher_dir, dtype="bfloat16", attn_implementation="eager", device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert load_causal_lm(tiny_teacher_dir).config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------
# Students carved from a teacher
# ---------------------------------------------------------------------------------------------------------


def test_student_layers_are_copies_of_the_kept_teacher_layers(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    student = student_from_teacher(str(tiny_teacher_dir), [0, 2], cache_dir=tmp_path)
    assert student == tmp_path / "students" / f"{tiny_teacher_dir.name}-layers-0-2"
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2

    teacher_w, student_w = _tensors(tiny_teacher_dir), _tensors(student)
    assert not any(".layers.2." in name for name in student_w)
    for student_layer, teacher_layer in enumerate([0, 2]):
        names = [n for n in teacher_w if n.startswith(f"model.layers.{teacher_layer}.")]
        assert len(names) == 9
        for name in names:
            twin = name.replace(f"layers.{teacher_layer}.", f"layers.{student_layer}.")
            assert torch.equal(student_w[twin], teacher_w[name]), twin
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student_w[name], teacher_w[name])
    assert len(student_w) == len(teacher_w) - 9

    assert load_tokenizer(student)(TEXT).input_ids == load_tokenizer(tiny_teacher_dir)(TEXT).input_ids
    assert _logits(student).shape == _logits(tiny_teacher_dir).shape


def test_student_with_all_layers_reproduces_the_teacher_exactly(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    student = student_from_teacher(str(tiny_teacher_dir), [0, 1, 2], cache_dir=tmp_path)
    assert torch.equal(_logits(student), _logits(tiny_teacher_dir))


def test_student_of_a_tied_teacher_stays_tied(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    teacher = tiny_llama(
        tmp_path / "tied", num_layers=3, seed=3, tokenizer_dir=tiny_tokenizer_dir, tie_word_embeddings=True
    )
    student = student_from_teacher(str(teacher), [0, 1, 2], cache_dir=tmp_path)
    assert "lm_head.weight" not in _tensors(student)
    assert json.loads((student / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.equal(_logits(student), _logits(teacher))


def test_student_of_a_sharded_teacher(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).save_pretrained(teacher, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(teacher)
    assert len(list(teacher.glob("model-*.safetensors"))) > 2
    student = student_from_teacher(str(teacher), [0, 1, 2], cache_dir=tmp_path)
    assert (student / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(student), _logits(tiny_teacher_dir))


def test_student_of_a_pytorch_bin_teacher(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "bin-teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    torch.save(_tensors(teacher), teacher / "pytorch_model.bin")
    (teacher / "model.safetensors").unlink()
    assert resolve_model(str(teacher)) == teacher
    student = student_from_teacher(str(teacher), [0, 2], cache_dir=tmp_path)
    assert not list(student.glob("*.bin"))
    reference = student_from_teacher(str(tiny_teacher_dir), [0, 2], cache_dir=tmp_path / "ref")
    assert torch.equal(_logits(student), _logits(reference))


def test_student_is_cached_and_name_clashes_are_refused(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    first = student_from_teacher(str(tiny_teacher_dir), [1], cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert student_from_teacher(str(tiny_teacher_dir), [1], cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp

    named = student_from_teacher(str(tiny_teacher_dir), [1, 2], cache_dir=tmp_path, name="mine")
    assert named == tmp_path / "students" / "mine"
    with pytest.raises(ModelConfigError, match="cached student .*mine was built from .*pass a distinct name"):
        student_from_teacher(str(tiny_student_dir), [1], cache_dir=tmp_path, name="mine")


@pytest.mark.parametrize(
    ("keep_layers", "message"),
    [
        ([], "must not be empty"),
        ([0, 0], "must be unique"),
        ([2, 0], "must be sorted"),
        ([0, 3], r"must lie in \[0, 3\)"),
        ([-1, 1], r"must lie in \[0, 3\)"),
    ],
)
def test_student_rejects_bad_keep_layers(
    tiny_teacher_dir: Path, tmp_path: Path, keep_layers: list[int], message: str
) -> None:
    with pytest.raises(ModelConfigError, match=rf"keep_layers=.*\(3 layers\): .*{message}"):
        student_from_teacher(str(tiny_teacher_dir), keep_layers, cache_dir=tmp_path)
    assert not (tmp_path / "students").exists()


# ---------------------------------------------------------------------------------------------------------
# Atomic, once-only folder building
# ---------------------------------------------------------------------------------------------------------


def _write_config(folder: Path) -> None:
    (folder / "weights.txt").write_text("x" * 1000)
    (folder / "config.json").write_text("{}")


def test_a_crashed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    final = tmp_path / "thing"

    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")  # looks complete, but the build has not finished
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        _build_once(final, crash)
    assert not final.exists()
    assert not list(tmp_path.glob(".thing.tmp-*"))
    assert _build_once(final, _write_config) == final
    assert (final / "weights.txt").read_text() == "x" * 1000


def test_stale_temp_dirs_are_swept_and_foreign_folders_refused(tmp_path: Path) -> None:
    stale = tmp_path / ".thing.tmp-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    _build_once(tmp_path / "thing", _write_config)
    assert not stale.exists()

    (tmp_path / "foreign").mkdir()
    with pytest.raises(ModelConfigError, match="not a complete model folder.*delete it"):
        _build_once(tmp_path / "foreign", _write_config)


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls: list[int] = []
    results: list[Path] = []

    def slow_build(folder: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        _write_config(folder)

    def build() -> None:
        results.append(_build_once(tmp_path / "t", slow_build))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1]
    assert results == [tmp_path / "t"] * 4


# ---------------------------------------------------------------------------------------------------------
# The real teacher (slow: converts SmolLM2 once into the default cache)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_folder_matches_the_gguf_model(smollm2_dir: Path) -> None:
    assert resolve_model(SMOLLM2_NAME) == smollm2_dir
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"]) == (49152, 30)
    assert "quantization_config" not in config
    assert vocab_size(SMOLLM2_NAME) == 49152
    assert not list(smollm2_dir.glob("*.bin"))

    tokenizer = load_tokenizer(smollm2_dir)
    gguf = smollm2_gguf_path()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs.input_ids.tolist() == gguf_tokenizer(prompt, return_tensors="pt").input_ids.tolist()

    model = load_causal_lm(smollm2_dir, device="cpu").eval()
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    reference = load_smollm2_gguf().eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = reference(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], 49152)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    assert logits[0, -1].argmax() == expected[0, -1].argmax()


@pytest.mark.slow
def test_smollm2_second_call_returns_at_once(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert smollm2_folder() == smollm2_dir
    assert time.perf_counter() - start < 0.5
    assert "converting" not in capsys.readouterr().err
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_smollm2_student_builds_and_runs(smollm2_dir: Path, tmp_path: Path) -> None:
    student = student_from_teacher(str(smollm2_dir), [0, 29], cache_dir=tmp_path)
    assert student.name == "smollm2-135m-instruct-layers-0-29"
    assert "lm_head.weight" not in _tensors(student)  # tied, like the teacher
    model = load_causal_lm(student, device="cpu").eval()
    assert model.config.num_hidden_layers == 2
    tokenizer = load_tokenizer(student)
    assert tokenizer.chat_template
    with torch.no_grad():
        logits = model(**tokenizer("The capital of France is", return_tensors="pt")).logits
    assert logits.shape[-1] == 49152
    assert torch.isfinite(logits).all()
