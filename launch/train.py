"""Online distillation: `python -m launch.train [group=option ...] [key=value ...]`.

The driver checks everything that can be checked cheaply (config, model folders, vocabularies, data,
resume target) before any model is loaded, then starts the Ray teacher pool (or attaches to a running
one: `teacher.attach=<run tag> ray.address=host:port`), launches the DeepSpeed student ranks
(`launch.student`), waits for them and prints the run's summary.

`launch.mode=prepare` does only the checks and writes the run directory; the Slurm scripts (`slurm/`)
then run the other steps on their nodes: `launch.teacher`, `launch.student` per task, `launch.summary`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from distill.cache import CacheError, check_run, read_manifest, row_digests, tokenizer_hash
from distill.config import ConfigError, build, register_configs, validate
from distill.data import PackedDataset, TrainWindows
from distill.data.prepare import prepare_datasets
from distill.documents import isolation_enabled
from distill.models import (
    check_model_folder,
    check_same_tokenizer,
    load_tokenizer,
    num_hidden_layers,
    vocab_size,
)
from distill.placement import GpuSplit, split_gpus, teacher_gpu_demand, visible_gpus
from distill.report.report import check_run_report, report_training_run
from distill.rundir import check_start, record_start
from distill.stream.routing import teacher_configs
from distill.student import checkpoint
from distill.student.objective import resolve_layer_map
from distill.teacher.tensor_parallel import check_teacher_config
from launch.curriculum import run_curriculum
from launch.errors import fail, reported_errors, show_traceback
from launch.preemption import PREEMPTION, Preempted, checkpointed_step
from launch.student import ERROR_FILE, PREEMPTED_EXIT, TEACHER_FAILED_EXIT, TEACHER_LOST_EXIT

log = logging.getLogger("distill")
register_configs()
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class RankFailure(RuntimeError):
    pass


def resolve_resume(mode: str, ckpt_root: Path) -> Path | None:
    """The checkpoint to resume from, verified, or None for a fresh start."""
    if mode == "off":
        return None
    found = checkpoint.latest(ckpt_root)
    if found is None:
        if mode == "latest":
            raise ConfigError(
                f"trainer.resume=latest but {ckpt_root} holds no checkpoint; run without it to start fresh "
                f"(or point hydra.run.dir / run_dir at the run to resume)."
            )
        return None
    checkpoint.verify(found)
    return found


def prepare(cfg: DictConfig, run_dir: Path) -> dict:
    """Everything that fails fast: returns what the ranks need, written into the run directory."""
    validate(cfg)
    no_teacher = cfg.teacher.source == "none"  # plain cross-entropy: no teacher is checked or started
    if no_teacher and cfg.features.layer_map is not None:
        raise ConfigError(
            "features.layer_map needs a teacher's hidden states, and teacher.source=none has no teacher; "
            "use features=none."
        )
    build(cfg.loss)  # the loss validates its own arguments
    resume_from = resolve_resume(str(cfg.trainer.resume), run_dir / "checkpoints")
    start = check_start(cfg, run_dir, resume_from)  # a run dir holds one run: refuse mixing, write nothing
    student_dir = str(build(cfg.student.model))
    check_model_folder(student_dir)  # weight files whole, weights fit config.json, tokenizer loads
    named = teacher_configs(cfg) if cfg.teachers else {"teacher": cfg.teacher}  # several: `teachers.<name>`
    named = {} if no_teacher else named
    teacher_dirs = {name: check_teacher(name, tc, student_dir, cfg.stream.topk) for name, tc in named.items()}
    teacher_dir = next(iter(teacher_dirs.values()), None)
    check_generated_tokenizer(cfg, student_dir)
    if cfg.features.layer_map is not None:
        resolve_layer_map(cfg.features.layer_map, student_dir, teacher_dir)  # every index within both depths
    t = cfg.trainer

    def same_stream(spec: dict) -> None:  # a resume continues the checkpoint's sample stream, or is refused
        if resume_from is not None:
            now = checkpoint.data_record(spec["digest"], cfg.data.seed, t, t.num_ranks)
            checkpoint.check_resume_data(resume_from, now)

    prepare_datasets(
        cfg.data,
        student_dir,
        run_dir / "data",
        num_ranks=t.num_ranks,
        global_batch=t.micro_batch_size * t.grad_accum_steps * t.num_ranks,
        check=same_stream,
    )
    if cfg.teacher.source == "cached":
        check_cache(cfg, run_dir / "data", student_dir, teacher_dir)
    record_start(start, cfg)  # config.yaml on the first start; later: config-history/, resumes.jsonl
    models = {"teacher": teacher_dir, "student": student_dir}
    if cfg.teachers:
        models["teachers"] = teacher_dirs
    (run_dir / "models.json").write_text(json.dumps(models, indent=1))
    resume = {"resume_from": str(resume_from) if resume_from else None}
    (run_dir / "resume.json").write_text(json.dumps(resume))  # read by ranks started without the driver
    return {"resume_from": resume_from, **models}


def check_teacher(name: str, tc: DictConfig, student_dir: str, topk: int) -> str:
    """The teacher's folder, once its vocabulary, depth, weight files and tokenizer fit the student and the
    stream: the tokenizers must be the same in content (vocabulary, merges, added and special tokens,
    normalisation), not only in size. A `teacher=cached` folder holds config + tokenizer, no weights."""
    key = "teacher" if name == "teacher" else f"teachers.{name}"
    teacher_dir = str(build(tc.model))
    if tc.source != "cached":  # weight files whole and of config.json's architecture, tokenizer loads
        check_model_folder(teacher_dir)
    teacher_vocab, student_vocab = vocab_size(teacher_dir), vocab_size(student_dir)
    if teacher_vocab != student_vocab:
        raise ConfigError(
            f"{key} vocabulary ({teacher_vocab} tokens, {teacher_dir}) differs from the student's "
            f"({student_vocab} tokens, {student_dir}); online top-k distillation needs one shared tokenizer."
        )
    if topk > teacher_vocab:
        raise ConfigError(f"stream.topk={topk} exceeds the {key} vocabulary ({teacher_vocab}).")
    if tc.stages > (layers := num_hidden_layers(teacher_dir)):
        raise ConfigError(f"{key}.stages={tc.stages} exceeds the teacher's {layers} layers.")
    if tc.source == "live":  # before any actor starts: heads, KV heads, MLP channels and GPUs must split
        check_teacher_config(key, tc, teacher_dir)
    if tc.source != "cached":
        check_same_tokenizer(teacher_dir, student_dir, (key, "student"))
    else:  # the cache keeps its teacher's config + tokenizer: the ids it holds are that tokenizer's
        fix = "Fix: write a cache for this student with `python -m launch.cache cache.path=<new> ...`."
        lead = "cache tokenizer mismatch: "
        check_same_tokenizer(teacher_dir, student_dir, ("cache", "student"), fix, CacheError, lead)
    return teacher_dir


def check_generated_tokenizer(cfg: DictConfig, student_dir: str) -> None:
    """data.tokens=generated trains on the ids `launch.generate` sampled, which mean tokens only to the
    generator's tokenizer: the student's must be the same (generation.json names the generator's folder)."""
    if cfg.data.format != "completions" or cfg.data.tokens != "generated":
        return
    meta = Path(cfg.data.source).expanduser() / "generation.json"
    if not meta.is_file():  # ids from elsewhere: the data layer checks the prompts' encoding
        return
    generator = json.loads(meta.read_text()).get("teacher")
    if not generator or not (Path(generator) / "config.json").is_file():
        raise ConfigError(
            f"data.tokens=generated: {meta} names the generator {generator}, which is gone, so the tokenizer "
            f"its ids belong to cannot be compared with the student's; restore that folder, or set "
            f"data.tokens=text to re-tokenise the completions with the student's tokenizer."
        )
    fix = "Fix: use a student with the generator's tokenizer, or data.tokens=text (re-tokenises the text)."
    check_same_tokenizer(generator, student_dir, ("generator", "student"), fix=fix)


def check_cache(cfg: DictConfig, data_dir: Path, student_dir: str, teacher_dir: str) -> None:
    """teacher=cached: the cache must hold this run's signals (tokenizer, data, seq_len, k, hidden layers)."""
    if cfg.teachers or cfg.data.sources:
        raise ConfigError("teacher=cached reads the cache of one teacher and one data source.")
    cache_dir = Path(cfg.cache.path).expanduser()
    layers = None
    if cfg.features.layer_map is not None:
        layers = sorted(set(resolve_layer_map(cfg.features.layer_map, student_dir, teacher_dir).values()))
    train, heldout = TrainWindows(data_dir), PackedDataset.load(data_dir / "heldout.npy")
    check_run(
        read_manifest(cache_dir),
        cache_dir,
        tokenizer=tokenizer_hash(student_dir, load_tokenizer(student_dir).eos_token_id),
        seq_len=cfg.data.seq_len,
        topk=cfg.stream.topk,
        train_digest=train.digest,
        heldout_rows=row_digests(heldout.tokens),
        hidden_layers=layers,
        document_isolation=isolation_enabled(cfg.data),
        sparsifier={"kind": cfg.stream.sparsifier, "samples": cfg.stream.samples},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(
    run_dir: Path,
    num_ranks: int,
    ray_address: str,
    run_tag: str,
    resume_from: Path | None,
    namespace: str,
    gpus: GpuSplit | None = None,
) -> None:
    """Start one `launch.student` process per rank; if one fails, stop the others and raise.

    `gpus`: this machine's split (`local_gpu_split`); the ranks then see only the students' GPUs (rank r
    takes the r-th, `LOCAL_RANK`), none when they train on CPU. None (no GPU here): the environment as is."""
    env = {
        **os.environ,
        "WORLD_SIZE": str(num_ranks),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DISTILL_RAY_ADDRESS": ray_address,
        "DISTILL_RAY_NAMESPACE": namespace,
        "DISTILL_RUN_TAG": run_tag,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    if resume_from is not None:
        env["DISTILL_RESUME_FROM"] = str(resume_from)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = GpuSplit.visible(gpus.students)
    PREEMPTION.check(run_dir)
    for stale in run_dir.glob(ERROR_FILE.format(rank="*")):  # a message of an earlier start is not this one's
        stale.unlink()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.student", str(run_dir)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            start_new_session=True,
        )
        for r in range(num_ranks)
    ]
    stopping = (None, 0, TEACHER_LOST_EXIT, TEACHER_FAILED_EXIT, PREEMPTED_EXIT)  # the others soon share
    forwarded = False
    try:
        while any(p.poll() is None for p in procs):
            if PREEMPTION.requested and not forwarded:  # each rank checkpoints and exits with PREEMPTED_EXIT
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGUSR1)
                forwarded = True
            if any(p.returncode == -signal.SIGUSR1 for p in procs):  # got it while starting: nothing trained
                break
            failed = [r for r, p in enumerate(procs) if p.returncode not in stopping]
            if failed:
                raise RankFailure(f"student rank {failed[0]} exited with code {procs[failed[0]].returncode}")
            time.sleep(0.5)
        codes = {p.returncode for p in procs}
        if codes == {PREEMPTED_EXIT} or -signal.SIGUSR1 in codes:
            raise Preempted(checkpointed_step(run_dir))  # the others are stopped below
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            step = checkpointed_step(run_dir)
            kept = (
                f"the students stopped with their progress checkpointed at step {step} in "
                f"{run_dir / 'checkpoints'}"
                if step
                else "the students stopped before completing a step"
            )
            if all(p.returncode == TEACHER_FAILED_EXIT for p in procs):
                said = sorted({f.read_text() for f in run_dir.glob(ERROR_FILE.format(rank="*"))})
                said = "; ".join(said) or "the teacher raised an error (see the ranks' log)"
                raise RankFailure(f"{said}; {kept}. Fix the teacher, then rerun with trainer.resume=latest.")
            if all(p.returncode == TEACHER_LOST_EXIT for p in procs):
                raise RankFailure(
                    f"the teacher stopped serving (every replica died, or a live one gave no answer within "
                    f"stream.max_wait_s: the ranks log says which); {kept}. Fix the teacher, then rerun "
                    f"with trainer.resume=latest."
                )
            raise RankFailure(f"student rank {failed[0]} exited with code {procs[failed[0]].returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait()


def summarize(run_dir: Path) -> dict:
    """Before/after evaluation, throughput and the export path, from the run's metrics file."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/kl" in r or "eval/ppl" in r]  # ppl alone: no teacher
    train = [r for r in records if "train/tokens_per_s" in r]
    summary = {
        "before": {k[5:]: v for k, v in evals[0].items() if k.startswith("eval/")},
        "after": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")},
        "steps": train[-1]["step"] if train else 0,
        "tokens_per_s": sum(r["train/tokens_per_s"] for r in train) / max(1, len(train)),
        "teacher_wait_fraction": sum(r["stream/wait_fraction"] for r in train) / max(1, len(train)),
        "bytes_per_token": train[-1]["stream/bytes_per_token"] if train else 0.0,
        "student": str(run_dir / "student") if (run_dir / "student").is_dir() else None,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_summary(s: dict) -> None:
    rows = [
        ("held-out KL(teacher‖student)", "kl", "{:.4f}"),
        ("held-out KL, top-k + tail bucket", "kl_topk_bucket", "{:.4f}"),  # cached runs: a lower bound
        ("top-1 agreement", "top1_agreement", "{:.2%}"),
        ("student perplexity", "ppl", "{:.4g}"),
        ("teacher perplexity", "teacher_ppl", "{:.4g}"),
    ]
    print("\n" + "=" * 64)
    print(f"{'metric':<32}{'before':>14}{'after':>14}")
    print("-" * 64)
    for label, key, fmt in [row for row in rows if row[1] in s["before"]]:
        print(f"{label:<32}{fmt.format(s['before'][key]):>14}{fmt.format(s['after'][key]):>14}")
    print("-" * 64)
    print(
        f"steps {s['steps']}  |  {s['tokens_per_s']:.0f} tokens/s  |  teacher wait "
        f"{s['teacher_wait_fraction']:.0%}  |  {s['bytes_per_token']:.0f} bytes/token on the stream"
    )
    print(f"exported student: {s['student']}\nrun directory:    {s['run_dir']}")
    print("=" * 64)


def local_gpu_split(cfg: DictConfig) -> GpuSplit | None:
    """This machine's GPUs split between the local teacher pool and the student ranks (distill/placement.py),
    or None on a machine without GPUs (nothing changes). Teachers on a Ray cluster (`ray.address`) or an
    attached pool take no local GPU. ConfigError when there are too few GPUs, before anything is computed."""
    visible = visible_gpus()
    if not visible:
        return None
    local_teachers = cfg.teacher.source == "live" and cfg.ray.address is None and not cfg.teacher.attach
    named = teacher_configs(cfg) if cfg.teachers else {"teacher": cfg.teacher}
    demand = teacher_gpu_demand(named) if local_teachers else 0.0
    split = split_gpus(visible, demand, cfg.trainer.gpus, cfg.trainer.num_ranks)
    log.info(
        "GPUs: teachers %s, student ranks %s",
        GpuSplit.visible(split.teachers) or "none",
        GpuSplit.visible(split.students) or "none (CPU)",
    )
    return split


def run(cfg: DictConfig, run_dir: Path) -> dict:
    run_dir = run_dir.resolve()
    validate(cfg)
    check_run_report(cfg)  # report.enabled: its settings and teacher, before anything trains
    gpus = local_gpu_split(cfg)  # too few GPUs: refused before the data is prepared or a model loads
    prepared = prepare(cfg, run_dir)
    if cfg.teacher.source in ("none", "cached"):  # no Ray, no teacher: plain cross-entropy, or a cache
        resume_from = prepared["resume_from"]
        launch_ranks(run_dir, cfg.trainer.num_ranks, "", "", resume_from, cfg.ray.namespace, gpus)
        return summarize(run_dir)
    # Ray only from here on: a cached or teacher-less run never imports it (the GPU check runs where it
    # is not installed)
    from distill.teacher.pool import TeacherPool, connect_ray

    teacher_gpus = None if gpus is None else gpus.teachers
    connect_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus, teacher_gpus)
    import ray

    tc = cfg.teacher
    if tc.attach and cfg.teachers:
        raise ConfigError("teacher.attach works with one teacher; several `teachers` are started per run.")
    if tc.attach:  # a pool someone else started (and will stop): e.g. one teacher for a whole sweep
        run_tag, pool = tc.attach, TeacherPool.attach(tc.attach, tc.replicas, tc.stages, tc.tensor_parallel)
        infos = pool.info()
        check_pool_isolation(infos, isolation_enabled(cfg.data), tc.attach)
        log.info("attached to teacher pool %s: %s", run_tag, infos[0]["device"])
    else:
        run_tag = f"{run_dir.name}-{os.getpid()}-{time.time_ns()}"
        PREEMPTION.check(run_dir)
        pool = start_teachers(run_tag, prepared, cfg, run_dir)
    try:
        launch_ranks(
            run_dir,
            cfg.trainer.num_ranks,
            ray.get_runtime_context().gcs_address,
            run_tag,
            prepared["resume_from"],
            cfg.ray.namespace,
            gpus,
        )
    finally:
        if not tc.attach:
            pool.shutdown()
    return summarize(run_dir)


def check_pool_isolation(infos: list[dict], isolate: bool, tag: str) -> None:
    """An attached pool's replicas must keep packed documents apart exactly when this run's students do
    (`document_eos` in each replica's info: None when they attend across documents)."""
    for i, info in enumerate(infos):
        kept_apart = info.get("document_eos") is not None
        if kept_apart != isolate:
            had, now = str(kept_apart).lower(), str(isolate).lower()
            raise ConfigError(
                f"teacher.attach={tag}: replica {i} was started with data.document_isolation={had}, this run "
                f"sets data.document_isolation={now}, so the student and the teacher would see different "
                f"contexts; set data.document_isolation={had} or start a pool with the run's setting."
            )


def start_teachers(run_tag: str, prepared: dict, cfg: DictConfig, run_dir: Path):
    """The run's teacher pool, or with `teachers:` one pool per named teacher (`<run tag>.<name>`), whose
    actors and processes are listed in `teachers.json` (shutdown waits until they are gone). `prepared`:
    the teacher folders from `prepare` (`models.json`)."""
    from distill.teacher.pool import TeacherPools, start_pool

    check_ray_resources(teacher_configs(cfg) if cfg.teachers else {"teacher": cfg.teacher})
    isolate = isolation_enabled(cfg.data)  # the teachers see the packed rows' documents as the students do
    if not cfg.teachers:
        pool = start_pool(run_tag, prepared["teacher"], cfg.teacher, isolate)
        # where each replica (and stage) runs: Ray node ids, devices, layers
        (run_dir / "teacher_pool.json").write_text(json.dumps(pool.info(), indent=1))
        return pool
    tcs = teacher_configs(cfg)
    named = {name: (prepared["teachers"][name], tcs[name]) for name in cfg.teachers}
    pools = TeacherPools.start(run_tag, named, functools.partial(start_pool, document_isolation=isolate))
    (run_dir / "teachers.json").write_text(json.dumps({"actors": pools.names, "pids": pools.pids()}))
    return pools


def check_ray_resources(named: dict[str, DictConfig]) -> None:
    """Refuse, before any model loads, teachers that ask for more CPUs or GPUs than the Ray cluster has:
    Ray would keep their actors pending forever and the run would hang without a word."""
    import ray

    have = ray.cluster_resources()
    for resource, per_replica in (("CPU", "cpus_per_replica"), ("GPU", "gpus_per_replica")):
        asks = {name: tc.replicas * tc[per_replica] for name, tc in named.items() if tc[per_replica]}
        if sum(asks.values()) > have.get(resource, 0) + 1e-9:
            detail = ", ".join(f"{name}: {need:g}" for name, need in asks.items())
            raise ConfigError(
                f"the teachers need {sum(asks.values()):g} {resource}s ({detail}; replicas x {per_replica}) "
                f"but the Ray cluster has {have.get(resource, 0):g}: lower {per_replica} or give Ray more "
                f"(ray.num_cpus, or the machine's GPUs, locally; TEACHER_CPUS, GPUS_PER_NODE or more "
                f"TEACHER_NODES on Slurm)."
            )


def name_sweep_point(cfg: DictConfig) -> None:
    """In a sweep (`-m`) every point logs to one W&B group (the sweep dir's name) as run <group>-<n>."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    if cfg.logger.group is None:
        cfg.logger.group = Path(hc.sweep.dir).name
    if cfg.logger.name is None:
        cfg.logger.name = f"{cfg.logger.group}-{hc.job.num}"


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="config", version_base="1.3")
@reported_errors  # bad input: one `error: ...` line, exit code 2 (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    run_dir = Path(cfg.run_dir or HydraConfig.get().runtime.output_dir)
    name_sweep_point(cfg)
    if cfg.launch.mode == "prepare" and cfg.curriculum:
        raise ConfigError(
            "a curriculum runs with the local driver (`python -m launch.train`, which starts each phase's "
            "teachers and ranks itself, e.g. inside one Slurm allocation); launch.mode=prepare (the Slurm "
            "scripts) runs single-phase runs: drop `curriculum` or submit one job per phase."
        )
    if cfg.launch.mode == "prepare":
        prepare(cfg, run_dir.resolve())
        print(f"prepared {run_dir.resolve()}")
        return {}
    signal.signal(signal.SIGUSR1, PREEMPTION.request)
    try:  # a curriculum: phases, each an ordinary run in its own sub-directory
        summary = run_curriculum(cfg, run_dir) if cfg.curriculum else run(cfg, run_dir)
    except Preempted as e:  # teachers are shut down; exit like the ranks so a batch script can requeue
        print(e, flush=True)
        sys.exit(PREEMPTED_EXIT)
    except RankFailure as e:  # the ranks printed their own errors; this says what happened and what next
        if show_traceback():
            raise
        fail(e, 1)
    print_summary(summary)
    if cfg.report.enabled and summary.get("student"):  # the exported student against the teacher
        command = shlex.join(["python", "-m", "launch.train", *sys.argv[1:]])
        print(f"report: {report_training_run(cfg, run_dir.resolve(), command)}")
    return summary


if __name__ == "__main__":
    main()
