"""Tokenise a corpus once: `python -m launch.tokenize source=DIR out=DIR tokenizer=MODEL [workers=N]`.

Text / JSONL / Parquet files of any size become Megatron `.bin`/`.idx` shards plus a manifest
(distill/data/tokenize.py): `workers` processes on this node, and with a Slurm array (`slurm/tokenize.sbatch`)
one task per array index (`task`, `num_tasks` default to $SLURM_ARRAY_TASK_ID / $SLURM_ARRAY_TASK_COUNT).
Rerunning the same command after a kill continues after the last finished shard. `verify=true` re-hashes
every shard against the manifest instead. Train on the result with `data=local data.source=<out>`.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distill.config import register_configs, validate_tokenize
from distill.data.corpus import DataError
from distill.data.shards import read_manifest
from distill.data.tokenize import TokenizeSpec, tokenize
from distill.files import sha256_file
from launch.errors import reported_errors

log = logging.getLogger("distill")
register_configs()
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def verify(out: Path, workers: int) -> dict:
    """Re-hash every shard file against the manifest, `workers` files at a time; raise on any mismatch."""
    manifest = read_manifest(out)
    files = {
        out / f"{s['name']}{suffix}": s[f"{suffix[1:]}_sha256"]
        for shards in manifest["shards"].values()
        for s in shards
        for suffix in (".bin", ".idx")
    }
    with ProcessPoolExecutor(workers) as pool:
        digests = dict(zip(files, pool.map(sha256_file, files)))
    bad = [str(path) for path, digest in digests.items() if digest != files[path]]
    if bad:
        raise DataError(
            f"{len(bad)} shard file(s) fail their sha256: {', '.join(bad[:5])}; re-tokenise them."
        )
    return {"verified": len(files), "out": str(out)}


def run(cfg: DictConfig) -> dict | None:
    env = os.environ
    if cfg.task is None:
        cfg.task = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if cfg.num_tasks is None:
        cfg.num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    validate_tokenize(cfg)
    out = Path(cfg.out).expanduser().resolve()
    if cfg.verify:
        return verify(out, cfg.workers)
    spec = TokenizeSpec(
        source=cfg.source,
        tokenizer=str(Path(cfg.tokenizer).expanduser()),
        format=cfg.format,
        text_field=cfg.text_field,
        heldout_fraction=cfg.heldout_fraction,
        split_seed=cfg.split_seed,
        shard_bytes=cfg.shard_bytes,
    )
    return tokenize(spec, out, workers=cfg.workers, task=cfg.task, num_tasks=cfg.num_tasks)


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="tokenize", version_base="1.3")
@reported_errors  # bad input: one `error: ...` line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    manifest = run(cfg)
    if manifest and "totals" in manifest:
        print(json.dumps({"out": str(Path(cfg.out).expanduser().resolve()), **manifest["totals"]}))
    elif manifest:
        print(json.dumps(manifest))


if __name__ == "__main__":
    main()
