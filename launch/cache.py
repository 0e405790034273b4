"""Write a teacher-signal cache: `python -m launch.cache cache.path=/path [group=option ...]`.

Composed from the same conf/ groups as training (teacher, data, stream) plus `cache.*`: it reads the data
exactly as a training run does, runs the teacher pool (replicas, pipeline stages) over every sequence
once, and writes top-`stream.topk` log-probs (and `cache.hidden_layers`' hidden states) to sharded
safetensors files with a JSON manifest. Rerunning the same command after an interruption continues from
the last complete shard. Training then reads it with `teacher=cached cache.path=/path`, without Ray.

`cache.from_generation=true` with `data=completions data.source=<launch.generate store=topk folder>` runs
no teacher: the top-k the generation stored become the cache (distill/cache/generation.py), so the same
data serves hard-label (`teacher.source=none`) and soft-label (`teacher=cached`) training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from distill.cache.generation import generation_signals, shard
from distill.cache.manifest import FORMAT, CacheError, row_digests, weights_hash
from distill.cache.writer import CacheWriter, fill, hidden_dtype, shard_plan
from distill.config import ConfigError, build, register_configs, validate_cache
from distill.data import PackedDataset, TrainWindows
from distill.data.prepare import prepare_datasets
from distill.documents import isolation_enabled
from distill.files import file_sha256, tokenizer_hash
from distill.models import check_model_folder, load_tokenizer, num_hidden_layers, vocab_size
from distill.teacher.actor import index_dtype
from distill.teacher.sparsify import sparsifier_of
from distill.teacher.tensor_parallel import check_teacher_config
from distill.tracking import TokenProgress
from launch.errors import reported_errors

log = logging.getLogger("distill")
register_configs()
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def pack_data(cfg: DictConfig, teacher_dir: Path, data_dir: Path) -> dict:
    """The training windows (memory-mapped) and held-out windows a training run on this data config
    reads, prepared into `data_dir` (one rank, so the held-out split is not trimmed to a multiple of the
    ranks; data.heldout_sequences caps it). Text sources stay in their tokenised shards; only small
    files (the run's data spec, held-out windows, packed completions) are written to `data_dir`."""
    prepare_datasets(cfg.data, str(teacher_dir), data_dir, num_ranks=1, global_batch=1)
    return {"train": TrainWindows(data_dir), "heldout": PackedDataset.load(data_dir / "heldout.npy")}


def identity(cfg: DictConfig, teacher_dir: Path, tokenizer, data: dict) -> dict:
    """What the cache holds, as the manifest records it; a resumed run must match every field."""
    vocab = vocab_size(teacher_dir)
    layers = list(cfg.cache.hidden_layers) if cfg.cache.hidden_layers else None
    if layers and not all(0 <= j < (depth := num_hidden_layers(teacher_dir)) for j in layers):
        raise ValueError(f"cache.hidden_layers={layers}: the teacher has {depth} layers (0..{depth - 1}).")
    return {
        "format": FORMAT,
        "teacher": {"weights_sha256": weights_hash(teacher_dir), "dtype": cfg.teacher.dtype},
        "tokenizer": tokenizer_hash(teacher_dir, tokenizer.eos_token_id),
        "seq_len": cfg.data.seq_len,
        "k": cfg.stream.topk,
        "values": cfg.cache.values_dtype,
        "codec": cfg.cache.codec,
        "sparsifier": cache_sparsifier(cfg),
        "index_dtype": index_dtype(vocab).name,
        "hidden": {"layers": layers, "dtype": hidden_dtype(cfg.cache.values_dtype)} if layers else None,
        "data": {
            "train": {"rows": len(data["train"]), "sha256": data["train"].digest},
            "heldout": {"rows": len(data["heldout"]), "row_sha256": row_digests(data["heldout"].tokens)},
        },
        "shard_sequences": cfg.cache.shard_sequences,
        "document_isolation": isolation_enabled(cfg.data),  # the teacher below is started with it
        **({"signals": "generation"} if cfg.cache.from_generation else {}),
    }


def cache_sparsifier(cfg: DictConfig) -> dict:
    """The manifest's record of which teacher entries the cache holds; sampled draws depend on the seed,
    so it is recorded for them (a resumed cache must draw with the same one)."""
    if cfg.stream.sparsifier == "topk":
        return {"kind": "topk", "samples": 0}
    return {"kind": cfg.stream.sparsifier, "samples": cfg.stream.samples, "seed": cfg.data.seed}


def check_generation(cfg: DictConfig, teacher_dir: Path) -> None:
    """cache.from_generation: completions data from a generation of this very teacher, no hidden states."""
    if cfg.data.format != "completions":
        raise CacheError(
            f"cache.from_generation needs data=completions data.source=<launch.generate folder>; "
            f"data.format is {cfg.data.format}."
        )
    if cfg.cache.hidden_layers:
        raise CacheError("cache.from_generation stores no hidden states; drop cache.hidden_layers.")
    if cfg.cache.codec != "none":
        raise CacheError(
            "cache.from_generation stores the generation's top-k as they are (with filler where a window "
            "has no signal); drop cache.codec (cache.codec=none)."
        )
    meta = Path(cfg.data.source).expanduser() / "generation.json"
    weights = sorted(teacher_dir.glob("*.safetensors")) or sorted(teacher_dir.glob("*.bin"))
    if meta.is_file() and json.loads(meta.read_text())["teacher_sha256"] != file_sha256(weights):
        raise CacheError(
            f"the generation in {meta.parent} was made by another teacher than {teacher_dir} (weights "
            f"sha256 differ); pick the teacher that generated it (see {meta})."
        )


def convert_generation(writer: CacheWriter, data: dict, signals: dict, plan: list) -> None:
    """Write every missing shard from the generation's stored top-k (no teacher, no Ray)."""
    m, arrays = writer.manifest, {"train": data["train"], "heldout": data["heldout"].tokens}
    for split, start, end in plan:
        if (split, start) in writer.written():
            continue
        values, ids, target = (x[start:end] for x in signals[split])
        target = target if split == "heldout" else None  # evaluation's teacher perplexity needs it
        writer.write_shard(split, start, shard(arrays[split][start:end], values, ids, target, m["values"]))


@contextlib.contextmanager
def ray_teacher_stream(cfg: DictConfig, teacher_dir: Path, hidden_layers: list[int] | None) -> Iterator:
    """The teacher pool `cfg.teacher` describes (Ray actors), as a stream of top-k replies; shut down after.
    Ray is imported here only, so writing a cache with an in-process teacher (`write(open_stream=...)`,
    benchmarks/gpu_check.py) needs no Ray."""
    from distill.stream import TeacherStream
    from distill.teacher import connect_ray
    from distill.teacher.pool import start_pool

    connect_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
    isolate = isolation_enabled(cfg.data)
    pool = start_pool(f"cache-{int(time.time() * 1e3)}", str(teacher_dir), cfg.teacher, isolate)
    try:
        yield TeacherStream(
            pool.actors,
            cfg.stream.topk,
            cfg.stream.prefetch,
            "float32",  # rounded to cache.values_dtype here, exactly as the actor would round
            cfg.stream.timeout_s,
            max_wait_s=cfg.stream.max_wait_s,
            hidden_layers=hidden_layers,
            sparsifier=sparsifier_of(cfg.stream, cfg.data.seed),
        )
    finally:
        pool.shutdown()


def write(cfg: DictConfig, open_stream: Callable | None = None) -> dict:
    """Check, prepare the data (into a temporary folder that lives while the cache is written), write.

    `open_stream(cfg, teacher_dir, hidden_layers)`: a context manager giving the teacher stream (an object
    with `stream(batches, input_ids_of)` and `full_log_probs(ids, start)`, float32 values); default: the Ray
    pool."""
    with tempfile.TemporaryDirectory(prefix="distill-cache-data-") as data_dir:
        return _write(cfg, Path(data_dir), open_stream or ray_teacher_stream)


def _write(cfg: DictConfig, data_dir: Path, open_stream: Callable = ray_teacher_stream) -> dict:
    validate_cache(cfg)
    cache_dir = Path(cfg.cache.path).expanduser().resolve()
    teacher_dir = Path(build(cfg.teacher.model))
    check_model_folder(teacher_dir)  # whole weight files that fit config.json, a tokenizer that loads
    if not cfg.cache.from_generation:  # a teacher will run: its tensor_parallel must shard it
        check_teacher_config("teacher", cfg.teacher, teacher_dir)
    if cfg.stream.topk > (vocab := vocab_size(teacher_dir)):
        raise ConfigError(f"stream.topk={cfg.stream.topk} exceeds the teacher vocabulary ({vocab}).")
    if cfg.cache.from_generation:
        check_generation(cfg, teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    data = pack_data(cfg, teacher_dir, data_dir)
    extra = {
        "vocab_size": vocab,
        "teacher_path": str(teacher_dir),
        "data_config": OmegaConf.to_container(cfg.data, resolve=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    signals = None
    if cfg.cache.from_generation:  # laid out (and every example checked) before the cache folder is made
        arrays = {"train": data["train"][:], "heldout": data["heldout"].tokens}  # completions: small
        signals = generation_signals(cfg.data, tokenizer, cfg.stream.topk, arrays, index_dtype(vocab))
    writer = CacheWriter(cache_dir, identity(cfg, teacher_dir, tokenizer, data), extra, teacher_dir)
    tokens = {s: len(d) * cfg.data.seq_len for s, d in data.items()}
    plan = shard_plan({s: len(d) for s, d in data.items()}, cfg.cache.shard_sequences)
    written = writer.written()
    done = sum((end - start) * cfg.data.seq_len for split, start, end in plan if (split, start) in written)
    if done:
        log.info("resuming %s: %d of %d shards already written", cache_dir, len(written), len(plan))
    if len(written) < len(plan) and cfg.cache.from_generation:
        convert_generation(writer, data, signals, plan)
    elif len(written) < len(plan):
        layers = writer.manifest["hidden"]["layers"] if writer.manifest["hidden"] else None
        with open_stream(cfg, teacher_dir, layers) as stream:
            progress = TokenProgress(sum(tokens.values()), done)
            fill(
                writer,
                stream,
                {"train": data["train"], "heldout": data["heldout"].tokens},
                cfg.cache.shard_sequences,
                cfg.cache.batch_size,
                progress,
            )
    summary = {"cache": str(cache_dir), "shards": len(plan), "tokens": tokens, **writer.finish()}
    print(json.dumps(summary))
    return summary


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="cache", version_base="1.3")
@reported_errors  # bad input: one `error: ...` line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    return write(cfg)


if __name__ == "__main__":
    main()
