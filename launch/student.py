"""One student rank of an online distillation run: the training loop.

Started once per rank by `launch.train` (locally) or by `srun` (Slurm) with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set, it reads the run's resolved config from the run directory, joins the
Ray cluster to reach the teacher actors, and trains the student with DeepSpeed:

    for each optimizer step:
        normaliser = counted tokens of the whole global batch (all ranks, all micro-batches)
        for each micro-batch (teacher output already requested `prefetch` micro-batches ahead):
            loss = Σ_tokens per-token loss / normaliser     -> mean over the global batch
                   (KD, plus the feature loss on the teacher's hidden states when features.layer_map is set)
            backward, step (DeepSpeed accumulates and steps at the boundary)
        on SIGUSR1 (Slurm's warning before preemption), once every rank has seen it at a step boundary:
            checkpoint, exit with PREEMPTED_EXIT (the batch script then requeues the job)

Under `srun`, RANK / WORLD_SIZE / LOCAL_RANK come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and
the teacher pool and resume point from the run directory (`teacher.json`, `resume.json`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate

from distill.cache import CachedTeacher, CacheError
from distill.config import load_run_config
from distill.data import PackedDataset, StepSampler, TrainWindows, sources
from distill.data.completions import load_position_mask, position_mask
from distill.dist import host_sum, init_host_group, sum_over_ranks, to_device
from distill.documents import isolation_enabled
from distill.eval import evaluate, evaluate_cached, evaluate_student
from distill.losses import check_teacher_indices, metrics_on_device
from distill.models import load_tokenizer
from distill.stream import StreamStats, TeacherStream
from distill.stream.client import TeacherRaisedError, TeacherStreamError
from distill.stream.routing import evaluate_domains, open_routed_stream, source_names
from distill.student import checkpoint
from distill.student.engine import build_engine, export_pretrained, init_distributed, load_student
from distill.student.objective import StudentObjective, build_projector
from distill.teacher.sparsify import sparsifier_of
from distill.tracking import Progress, RunLogger

# No Ray import at module level: a rank of a `teacher=cached` or teacher-less run imports nothing from Ray
# (tests/test_dist.py), so the student side runs where Ray is not installed; live runs import it below.

log = logging.getLogger("distill")
PREEMPTED_EXIT = 75  # checkpointed on SIGUSR1 and stopped; the run continues after a requeue
TEACHER_LOST_EXIT = 76  # every teacher replica is gone: checkpointed and stopped with the cause logged
TEACHER_FAILED_EXIT = 77  # the teacher raised an error: checkpointed and stopped, its message in ERROR_FILE
ERROR_FILE = "teacher-error-rank{rank}.txt"  # in the run directory: the teacher's message, for the driver


class Preemption:
    """Remembers a SIGUSR1; the loop acts on it at the next optimizer-step boundary, on every rank at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGUSR1, self.request)

    def request(self, *_):
        self.requested = True


class NoTeacher:
    """`teacher.source=none` in the stream's place: micro-batches come with no teacher output."""

    def __init__(self):
        self.stats = StreamStats()

    def stream(self, batches, _input_ids_of):
        return ((batch, None) for batch in batches)


def slurm_rank_env() -> None:
    """Under `srun` (no launcher setting RANK), take rank and world size from Slurm's task variables."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])


def teacher_location(run_dir: Path) -> dict:
    """Ray address, namespace and run tag of the pool: from launch.train (env) or launch.teacher (file)."""
    if "DISTILL_RUN_TAG" in os.environ:
        return {
            "ray_address": os.environ.get("DISTILL_RAY_ADDRESS"),
            "namespace": os.environ["DISTILL_RAY_NAMESPACE"],
            "run_tag": os.environ["DISTILL_RUN_TAG"],
        }
    return json.loads((run_dir / "teacher.json").read_text())


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """labels[t] = ids[t + 1]; the last position has no target (-100) but still gets the teacher's KD."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def whole_steps(pairs: Iterator, grad_accum_steps: int) -> Iterator[tuple[list, Exception | None]]:
    """The (batch, teacher output) pairs of one optimizer step at a time, as (pairs, None); if the stream
    fails, (the pairs received so far, error) and stop.

    A rank that lost its teacher must not simply raise: the other ranks would wait forever in the next
    collective. The loop all-reduces the error flag once per step, before the step's first forward, so
    every rank stops at the same step boundary (none has started a step another cannot finish), with one
    agreement per optimizer step instead of one per micro-batch. The stream keeps `prefetch` requests in
    flight beyond the pairs taken, so the teacher works on the next step while this one trains.
    """
    step: list = []
    try:
        for pair in pairs:
            step.append(pair)
            if len(step) == grad_accum_steps:
                yield step, None
                step = []
    except TeacherStreamError as e:
        yield step, e


def main(run_dir: Path) -> None:
    preemption = Preemption()
    slurm_rank_env()
    cfg = load_run_config(run_dir)
    models = json.loads((run_dir / "models.json").read_text())
    t = cfg.trainer
    rank, world = init_distributed(t.dist_backend)
    init_host_group()  # gloo side group for host-side counters (collective: every rank, here)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    torch.set_num_threads(t.threads_per_rank)
    quiet_libraries()
    torch.manual_seed(t.seed)

    live = cfg.teacher.source == "live"  # none: no teacher at all, plain cross-entropy
    cached = cfg.teacher.source == "cached"  # the teacher's signals come from a cache: no Ray
    if live:
        from distill.teacher import connect_ray

        pool = teacher_location(run_dir)
        connect_ray(pool["ray_address"] or cfg.ray.address, pool["namespace"])

    train = TrainWindows(run_dir / "data")  # memory-mapped shards: each rank reads only its windows
    heldout = PackedDataset.load(run_dir / "data" / "heldout.npy").tokens[rank::world]
    # data.format=completions: only positions predicting a completion token count (None: all of them)
    heldout_positions = load_position_mask(run_dir / "data" / "heldout_mask.npy")
    heldout_positions = None if heldout_positions is None else heldout_positions[rank::world]

    def loss_mask(idx: np.ndarray) -> np.ndarray:
        """The positions of training sequences `idx` that count in the loss. Plain text: all of them,
        except the last one with no teacher (cross-entropy needs a next token; KD does not)."""
        targets = train.target_mask(idx)
        if targets is not None:
            return position_mask(targets)
        mask = np.ones((len(idx), train.seq_len), dtype=np.bool_)
        mask[:, -1] = live or cached
        return mask

    tokenizer = load_tokenizer(models["student"])
    eos = tokenizer.eos_token_id if isolation_enabled(cfg.data) else None  # packed documents kept apart
    model = load_student(models["student"], t, world, cfg.student.attn_implementation, document_eos=eos)
    vocab = model.config.vocab_size  # teacher ids must index it (checked per reply, on the host)
    if cfg.student.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    projector = build_projector(cfg.features, models["student"], models["teacher"], seed=t.seed)
    objective = StudentObjective(model, instantiate(cfg.loss), fused=t.fused_loss, projector=projector)
    engine = build_engine(objective, t, world)
    if cfg.teachers:  # several teachers: each row is scored by its source's teacher (distill/stream/routing)
        stream = open_routed_stream(cfg, pool["run_tag"], lambda mb: train.source_index(mb[1]))
        domains = sources.domains(run_dir / "data", source_names(cfg), rank, world)
    elif cached:
        stream = CachedTeacher(cfg.cache.path, cfg.stream.topk, hidden_layers=objective.teacher_layers)
        damaged = stream.verify(rank, world)  # each rank hashes its share: every shard once per run
        if host_sum([len(damaged)])[0]:
            where = ", ".join(damaged) if damaged else "found by another rank"
            raise CacheError(
                f"cache shards of {cfg.cache.path} fail their sha256 checksum ({where}): the files are "
                f"damaged. Rewrite the cache (`python -m launch.cache` with a new cache.path)."
            )
    elif not live:
        stream = NoTeacher()
    else:
        from distill.teacher import TeacherPool

        tc = cfg.teacher
        teacher = TeacherPool.attach(pool["run_tag"], tc.replicas, tc.stages, tc.tensor_parallel)
        stream = TeacherStream(
            teacher.actors,
            cfg.stream.topk,
            cfg.stream.prefetch,
            cfg.stream.values_dtype,
            cfg.stream.timeout_s,
            hidden_layers=objective.teacher_layers,  # None unless feature distillation is on
            first_replica=rank,
            max_wait_s=cfg.stream.max_wait_s,
            codec=cfg.stream.codec,
            sparsifier=sparsifier_of(cfg.stream, cfg.data.seed),
        )
    device = engine.device
    sampler = StepSampler(
        train.sizes, t.micro_batch_size, t.grad_accum_steps, world, rank, cfg.data.seed, train.weights
    )

    trained_on = checkpoint.data_record(train.digest, cfg.data.seed, t, world)  # each checkpoint records it
    ckpt_root = run_dir / "checkpoints"
    start_step = 0
    resume_from = os.environ.get("DISTILL_RESUME_FROM")
    if resume_from is None and "DISTILL_RUN_TAG" not in os.environ:  # not started by launch.train
        resume_from = json.loads((run_dir / "resume.json").read_text())["resume_from"]
    if resume_from:
        start_step = checkpoint.load(engine, Path(resume_from))["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    elif (run_dir / "phase.json").is_file():  # a curriculum phase starts from the previous phase's end
        phase = json.loads((run_dir / "phase.json").read_text())
        checkpoint.load_weights(engine, Path(phase["init_from"]), optimizer=not phase["reset_optimizer"])
        log.info("phase %s starts from %s", phase["name"], phase["init_from"])

    logger = RunLogger(run_dir, cfg.logger, json.loads(json.dumps(cfg_dict(cfg))), enabled=rank == 0)

    def run_eval(step: int) -> dict:
        started, teacher_bytes = time.perf_counter(), getattr(stream, "eval_bytes", 0)
        if cfg.teachers:  # every domain's held-out set, against every teacher of the run
            metrics = evaluate_domains(engine.module.model, stream, domains, cfg, t.micro_batch_size)
        elif cached:  # no full teacher distribution: top-k + tail-bucket KL, agreement, perplexities
            topk, micro = stream.heldout, t.micro_batch_size
            metrics = evaluate_cached(engine.module.model, heldout, topk, micro, heldout_positions)
        elif not live:  # no teacher: the student's perplexity alone
            metrics = evaluate_student(engine.module.model, heldout, t.micro_batch_size, heldout_positions)
        else:
            log_probs, micro = stream.full_log_probs, t.micro_batch_size
            metrics = evaluate(engine.module.model, heldout, log_probs, micro, heldout_positions)
        cost = {  # what this evaluation cost: its seconds and the teacher log-probs it pulled (this rank)
            "eval_cost/seconds": time.perf_counter() - started,
            "eval_cost/teacher_mib": (getattr(stream, "eval_bytes", 0) - teacher_bytes) / 2**20,
        }
        logger.log(step, {**{f"eval/{k}": v for k, v in metrics.items()}, **cost})
        if rank == 0:
            log.info("eval @ step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    stop = t.stop_at_step or t.max_steps
    scale = world * t.grad_accum_steps  # DeepSpeed averages over ranks and accumulation steps; undo it
    micro_batches = ((step, idx) for step in range(start_step, stop) for idx in sampler.micro_batches(step))
    progress = Progress(t.max_steps, start_step, t.log_every)
    sums: dict[str, float | torch.Tensor] = {}  # this step's loss and metric sums (float64 on the device)
    preempted = False
    step_start, stats_start, normaliser = time.perf_counter(), stream.stats.copy(), 0.0
    sample_log = open_sample_log(run_dir, rank) if t.record_samples else None
    completed = start_step  # the last optimizer step whose update is in the weights

    def train_one(step: int, micro: int, idx: np.ndarray, teacher_out, normaliser: float) -> None:
        """Forward, backward and (at the step's last micro-batch) the optimizer step of one micro-batch;
        its loss and metric sums are added to `sums` without reading them on the host (tensors stay on
        the device until the step's one reduction)."""
        ids = to_device(torch.from_numpy(train[idx].astype(np.int64)), device)
        values, indices, hidden, offset = None, None, {}, None  # no teacher: plain cross-entropy
        if teacher_out is not None:
            values, indices = teacher_out.tensors()
            check_teacher_indices(indices, vocab)  # on the host, before the copy: no device sync
            values, indices = to_device(values, device), to_device(indices, device)
            hidden = {layer: to_device(h, device) for layer, h in teacher_out.hidden_tensors().items()}
            if teacher_out.offset is not None:  # sampled sparsifiers: the KL value's constant per position
                offset = to_device(teacher_out.offset_tensor(), device)
        # the mask stays on the host: the losses select its rows without waiting for the device
        labels, mask = next_token_labels(ids), torch.from_numpy(loss_mask(idx))
        with metrics_on_device():  # the loss's metric sums stay device tensors: no host sync here
            loss, loss_metrics = engine(ids, values, indices, labels, mask, normaliser, step, hidden, offset)
        engine.backward(loss * scale)
        engine.step()
        if sample_log:  # this micro-batch is in the gradients now
            record = {"step": step + 1, "micro_batch": micro, "samples": idx.tolist()}
            sample_log.write(json.dumps(record) + "\n")
        for key, value in {"loss": loss, **loss_metrics}.items():
            # float64 like the host sums they replace, so CPU results are unchanged to the last bit
            value = value.detach().double() if torch.is_tensor(value) else float(value)
            sums[key] = sums.get(key, 0.0) + value

    try:
        if start_step == 0:
            run_eval(0)
        pairs = stream.stream(micro_batches, lambda mb: train[mb[1]])
        for step_pairs, lost in whole_steps(pairs, t.grad_accum_steps):
            # counted positions of the whole step (this rank, from the host-side masks), summed over ranks
            # with the lost-teacher flag: one host-side agreement per step, no GPU sync
            step_tokens = sum(int(loss_mask(idx).sum()) for (_, idx), _ in step_pairs) if lost is None else 0
            raised = isinstance(lost, TeacherRaisedError)
            normaliser, ranks_lost, ranks_raised = host_sum([step_tokens, lost is not None, raised])
            if ranks_raised and not raised:  # the teacher's own error on another rank decides how all stop
                raise TeacherRaisedError("the teacher raised an error on another rank's request (see below)")
            if ranks_lost:
                raise lost or TeacherStreamError("another rank lost the teacher stream")
            step = step_pairs[0][0][0]
            for micro, ((_, idx), teacher_out) in enumerate(step_pairs):
                train_one(step, micro, idx, teacher_out, normaliser)

            # ---- optimizer step `step` done: log, evaluate, checkpoint ----
            done = completed = step + 1
            elapsed = time.perf_counter() - step_start
            teacher = stream.stats.since(stats_start).as_vector()  # summed over ranks below
            local = [sums.pop("loss"), elapsed, *sums.values(), float(preemption.requested), *teacher]
            # the step's one collective and one host sync: device sums and host numbers in one tensor
            loss_sum, elapsed_sum, *rest = sum_over_ranks(local, device).tolist()
            rest, teacher = rest[: -len(teacher)], rest[-len(teacher) :]
            *rest, preempt_votes = rest
            preempted = preempt_votes > 0 and done < stop  # every rank sees the same sum: all stop together
            reduced = dict(zip(sums, rest))
            tokens = reduced.get("tokens", normaliser)
            metrics = {
                "train/loss": loss_sum,  # sparse top-k estimate (biased low); eval/kl is the exact one
                "train/lr": engine.get_lr()[0],
                "train/tokens_per_s": normaliser / (elapsed_sum / world),
                "stream/bytes_per_token": stream.stats.bytes / max(1, stream.stats.tokens),
                # activations between a pipeline replica's stages, per token (summed over its hops)
                "stream/hop_bytes_per_token": stream.stats.hop_bytes / max(1, stream.stats.tokens),
                **StreamStats.metrics(teacher, wall_s=elapsed_sum / world, ranks=world),
            }
            for key, value in reduced.items():
                if key.endswith("_sum"):
                    metrics[f"train/{key[:-4]}"] = value / tokens
            logger.log(done, metrics)
            if rank == 0:
                progress.update(done, metrics)
            sums, step_start, stats_start = {}, time.perf_counter(), stream.stats.copy()

            if done % t.eval_every == 0 and done != t.max_steps:
                run_eval(done)
            if done % t.checkpoint_every == 0 or done == stop or preempted:
                state = {"step": done, "data": trained_on}
                path = checkpoint.save(engine, ckpt_root, done, state, t.keep_checkpoints)
                if rank == 0:
                    log.info("checkpoint saved: %s", path)
            if preempted:
                break
        final = run_eval(t.max_steps) if stop == t.max_steps and not preempted else None
    except TeacherStreamError as error:  # raised on every rank at the same point (agreed by all-reduce)
        keep = t.keep_checkpoints
        stop_without_teacher(run_dir, engine, completed, trained_on, keep, error, logger, rank)
    finally:
        if sample_log:
            sample_log.close()

    if preempted:
        if rank == 0:
            log.info("preempted (SIGUSR1): stopped after the checkpoint at step %d; requeue to resume", done)
            logger.finish()
    elif final is not None:
        export_pretrained(engine, tokenizer, run_dir / "student")
        if rank == 0:
            log.info("exported student: %s", run_dir / "student")
            logger.finish({f"final/{k}": v for k, v in final.items()})
    elif rank == 0:
        log.info(
            "stopped at step %d of %d (trainer.stop_at_step); resume with trainer.resume=latest",
            stop,
            t.max_steps,
        )
        logger.finish()
    dist.barrier()
    dist.destroy_process_group()
    if preempted:
        sys.exit(PREEMPTED_EXIT)


def open_sample_log(run_dir: Path, rank: int):
    """`trainer.record_samples`: one JSON line per micro-batch trained (optimizer step, micro-batch, sample
    ids), appended and line-buffered, so a crash keeps every line written; a resumed run appends the
    steps it re-trains after the checkpoint it resumed from."""
    (run_dir / "samples").mkdir(exist_ok=True)
    return open(run_dir / "samples" / f"rank{rank}.jsonl", "a", buffering=1)


def stop_without_teacher(
    run_dir: Path, engine, step: int, trained_on: dict, keep: int, error, logger, rank: int
) -> None:
    """The teacher cannot serve the run (every replica gone, a live one not answering, or an error raised
    inside it): keep the progress made (checkpoint the last completed step unless it is already saved), say
    why and how to continue, and exit on every rank with TEACHER_FAILED_EXIT when the teacher raised an
    error (each rank that received it writes its message to ERROR_FILE for the driver), else
    TEACHER_LOST_EXIT."""
    ckpt_root = run_dir / "checkpoints"
    latest = checkpoint.latest(ckpt_root)
    if step > 0 and (latest is None or latest != checkpoint.step_dir(ckpt_root, step)):
        checkpoint.save(engine, ckpt_root, step, {"step": step, "data": trained_on}, keep)
    failed = isinstance(error, TeacherRaisedError)
    if failed and not str(error).startswith("the teacher raised an error on another rank"):
        (run_dir / ERROR_FILE.format(rank=rank)).write_text(str(error))
        log.error("rank %d: %s", rank, error)
    if rank == 0:
        fix = (
            "Fix the teacher (its message above: e.g. its memory, or stream.values_dtype for fp16 overflow)"
            if failed
            else "Restore the teacher (more replicas, teacher.max_restarts, a healthy node)"
        )
        log.error(
            "teacher %s: %s. Training stopped after step %d; the checkpoint is in %s. %s and rerun with "
            "trainer.resume=latest.",
            "failed" if failed else "lost",
            error,
            step,
            ckpt_root,
            fix,
        )
        logger.finish()
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(TEACHER_FAILED_EXIT if failed else TEACHER_LOST_EXIT)


def quiet_libraries() -> None:
    """Keep the console for our progress lines: no per-file load bars, no upstream deprecation notes."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def cfg_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
