"""Teacher-generated completions for a file of prompts: `python -m launch.generate prompts=P out=DIR`.

The first step of hard-label distillation (README, "Synthetic data"): the teacher's Ray actors answer
every prompt (`sampling.n` samples each, `batch_size` prompts per request, spread over
`teacher.replicas`); the student is then fine-tuned on the answers with
`python -m launch.train teacher=none data=completions data.source=DIR`.

The output folder is resumable and its parts are never rewritten:

    generation.json              teacher folder + weights sha256, prompts file + sha256, every parameter
    part-<first prompt>.parquet  one per batch of prompts, one row per sample: prompt_index, sample_index,
                                 prompt, completion, prompt_ids, completion_ids, finished, teacher,
                                 teacher_sha256, params (JSON) and, with store=topk, the teacher's top-k
                                 log-probs on every completion token (topk_values, topk_ids) and the
                                 log-prob of each drawn token (token_logprob)

A part is written under a temporary name and renamed, so a killed run leaves only whole parts; a rerun
with the same settings skips the prompts they hold, and other settings into the same folder are refused.
Sample j of prompt i draws its randomness from (seed, i, j) alone, so the output does not depend on the
batch size, the number of replicas or interruptions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from distill.config import ConfigError, build, register_configs
from distill.data.completions import prompt_ids
from distill.files import file_sha256
from distill.models import check_model_folder, load_tokenizer
from distill.teacher import connect_ray
from distill.teacher.generate import sample_seed
from distill.teacher.pool import start_pool
from distill.teacher.tensor_parallel import check_teacher_config
from distill.tracking import _fmt_duration
from launch.errors import reported_errors

log = logging.getLogger("distill")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
register_configs()


def read_prompts(path: Path) -> list[str]:
    """Prompts of a .jsonl file (field "prompt") or a .txt file (one per non-empty line), in file order."""
    if not path.is_file():
        raise ConfigError(f'prompts={path}: no such file; give a .jsonl (field "prompt") or .txt file.')
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        table = pa_json.read_json(path)
        if "prompt" not in table.column_names:
            raise ConfigError(f'{path} has no "prompt" field (fields: {", ".join(table.column_names)}).')
        prompts = table.column("prompt").to_pylist()
    else:
        raise ConfigError(f'prompts={path}: use a .jsonl file (field "prompt") or a .txt file.')
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"{path} holds no prompts, or an empty one; every prompt must be non-empty text.")
    return prompts


def check(cfg: DictConfig) -> None:
    s = cfg.sampling
    if cfg.teacher.stages > 1:
        raise ConfigError(
            f"teacher.stages={cfg.teacher.stages}: generation needs whole-model replicas (a pipeline-sharded "
            "replica cannot generate yet); use teacher.stages=1 (teacher.tensor_parallel may be > 1) and, "
            "for throughput, more teacher.replicas."
        )
    for key, value, low in (("max_new_tokens", s.max_new_tokens, 1), ("n", s.n, 1)):
        if value < low:
            raise ConfigError(f"sampling.{key}={value} must be >= {low}.")
    if s.temperature < 0:
        raise ConfigError(f"sampling.temperature={s.temperature} must be >= 0 (0 = greedy).")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"sampling.top_p={s.top_p} must be in (0, 1].")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1.")
    if cfg.store not in ("none", "topk") or cfg.topk < 1:
        raise ConfigError(f"store={cfg.store} topk={cfg.topk}: store is none or topk, and topk >= 1.")


def identity(cfg: DictConfig, teacher_dir: Path, prompts_path: Path) -> dict:
    """What determines the output: a folder holding another generation's parts cannot be resumed."""
    weights = sorted(teacher_dir.glob("*.safetensors")) or sorted(teacher_dir.glob("*.bin"))
    return {
        "teacher": str(teacher_dir),
        "teacher_sha256": file_sha256(weights),
        "prompts": str(prompts_path),
        "prompts_sha256": file_sha256([prompts_path]),
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        "store": cfg.store,
        "topk": cfg.topk if cfg.store == "topk" else None,
    }


def open_output(out: Path, ident: dict) -> set[int]:
    """Create or resume the output folder; returns the prompt indices already done."""
    meta = out / "generation.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        changed = [k for k in ident if k not in ("teacher", "prompts") and old.get(k) != ident[k]]
        if changed:
            raise ConfigError(
                f"{out} holds a generation with other settings ({', '.join(changed)} differ); rerun with the "
                f"settings in {meta} to resume it, or choose a new out=..."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ident, indent=1))
        tmp.replace(meta)
    for stale in out.glob("*.parquet.tmp"):  # a part a killed run did not finish
        stale.unlink()
    parts = sorted(out.glob("part-*.parquet"))
    return {i for part in parts for i in pq.read_table(part, columns=["prompt_index"]).column(0).to_pylist()}


def write_part(out: Path, rows: list[dict]) -> Path:
    """One batch's rows as a parquet part, atomically (temporary name, then rename); never overwrites."""
    path = out / f"part-{rows[0]['prompt_index']:08d}.parquet"
    if path.exists():
        raise FileExistsError(f"{path} exists; parts are never rewritten")
    types = {
        "topk_values": pa.list_(pa.list_(pa.float32())),
        "topk_ids": pa.list_(pa.list_(pa.int32())),
        "token_logprob": pa.list_(pa.float32()),
    }
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    table = pa.table({key: pa.array(values, type=types.get(key)) for key, values in columns.items()})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def stop_and_pad_ids(tokenizer, teacher_dir: Path) -> tuple[list[int], int]:
    """Generation stops at the tokenizer's EOS and the model's configured EOS ids; pads with pad or EOS."""
    stops = {tokenizer.eos_token_id}
    for name in ("generation_config.json", "config.json"):
        if (teacher_dir / name).is_file():
            eos = json.loads((teacher_dir / name).read_text()).get("eos_token_id")
            stops |= set(eos if isinstance(eos, list) else [eos])
    stops.discard(None)
    if not stops:
        raise ConfigError(f"the teacher {teacher_dir} defines no EOS token, so completions could never end.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    return sorted(stops), pad


def generate(cfg: DictConfig) -> dict:
    check(cfg)
    prompts_path, out = Path(cfg.prompts).expanduser().resolve(), Path(cfg.out).expanduser().resolve()
    prompts = read_prompts(prompts_path)
    teacher_dir = Path(build(cfg.teacher.model))
    check_model_folder(teacher_dir)  # whole weight files that fit config.json, a tokenizer that loads
    check_teacher_config("teacher", cfg.teacher, teacher_dir)  # tensor_parallel must shard it
    tokenizer = load_tokenizer(teacher_dir)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    limit = json.loads((teacher_dir / "config.json").read_text()).get("max_position_embeddings")
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    if limit and len(encoded[longest]) + cfg.sampling.max_new_tokens > limit:
        raise ConfigError(
            f"prompt {longest} has {len(encoded[longest])} tokens; with sampling.max_new_tokens="
            f"{cfg.sampling.max_new_tokens} that exceeds the teacher's context ({limit}); shorten it."
        )
    ident = identity(cfg, teacher_dir, prompts_path)
    done = open_output(out, ident)
    todo = [i for i in range(len(prompts)) if i not in done]
    log.info("%d prompts, %d already done, %d to generate into %s", len(prompts), len(done), len(todo), out)
    if not todo:
        return {"out": str(out), "prompts": len(prompts), "generated": 0}

    s = cfg.sampling
    stop_ids, pad_id = stop_and_pad_ids(tokenizer, teacher_dir)
    sampling = {
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stop_ids": stop_ids,
        "pad_id": pad_id,
    }
    topk = cfg.topk if cfg.store == "topk" else 0
    params = json.dumps({**ident["sampling"], "store": cfg.store, "topk": ident["topk"]}, sort_keys=True)
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]

    connect_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
    run_tag = f"generate-{out.name}-{time.time_ns()}"
    pool = start_pool(run_tag, str(teacher_dir), cfg.teacher)
    start, tokens, finished_prompts = time.perf_counter(), 0, 0
    try:
        import ray

        pending: dict = {}

        def submit(replica, batch: list[int]) -> None:
            samples = [(i, j) for i in batch for j in range(s.n)]
            ref = replica.submit_generate(
                [encoded[i] for i, _ in samples],
                [sample_seed(s.seed, i, j) for i, j in samples],
                sampling,
                topk,
            )
            pending[ref] = (replica, samples)

        queue = iter(batches)
        for replica in pool.actors * 2:  # two requests in flight per replica: one computing, one queued
            if (batch := next(queue, None)) is not None:
                submit(replica, batch)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            replica, samples = pending.pop(ref)
            rows = []
            for (i, j), result in zip(samples, ray.get(ref)):
                ids = result.pop("completion_ids")
                text = tokenizer.decode(ids, skip_special_tokens=True)
                extra = {k: v.tolist() for k, v in result.items() if k.startswith(("topk_", "token_"))}
                rows.append(
                    {
                        "prompt_index": i,
                        "sample_index": j,
                        "prompt": prompts[i],
                        "completion": text,
                        "prompt_ids": encoded[i],
                        "completion_ids": ids,
                        "finished": result["finished"],
                        "teacher": ident["teacher"],
                        "teacher_sha256": ident["teacher_sha256"],
                        "params": params,
                        **extra,
                    }
                )
                tokens += len(ids)
            write_part(out, rows)
            finished_prompts += len(rows) // s.n
            if (batch := next(queue, None)) is not None:
                submit(replica, batch)
            elapsed = time.perf_counter() - start
            eta = elapsed / finished_prompts * (len(todo) - finished_prompts)
            log.info(
                "prompts %d/%d | %.0f tokens/s | eta %s",
                len(done) + finished_prompts,
                len(prompts),
                tokens / elapsed,
                _fmt_duration(eta),
            )
    finally:
        pool.shutdown()
    elapsed = time.perf_counter() - start
    summary = {"out": str(out), "prompts": len(prompts), "generated": len(todo) * s.n, "tokens": tokens}
    summary["tokens_per_s"] = tokens / elapsed
    print(json.dumps(summary))
    return summary


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="generate", version_base="1.3")
@reported_errors  # bad input: one `error: ...` line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    return generate(cfg)


if __name__ == "__main__":
    main()
