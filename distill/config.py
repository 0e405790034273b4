"""Structured configs: the schema every composed Hydra config is checked against.

Hydra rejects unknown keys and wrong types when it composes the config (these dataclasses are
registered as the schema); `validate` then checks ranges and cross-field rules, so a bad value
fails with a message naming the key and the fix before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


# What `trainer.allow_changes` may list: changes a resumed run can make safely when asked for explicitly
# (a longer schedule; another split of the same global batch). Every other change to what is trained is
# refused on resume (distill/rundir.py).
RESUME_CHANGES = (
    "trainer.max_steps",
    "trainer.num_ranks",
    "trainer.micro_batch_size",
    "trainer.grad_accum_steps",
)


@dataclass
class TeacherConfig:
    # live: Ray teacher actors run during training | cached: read a teacher-signal cache written once by
    # `launch.cache` (no teacher runs) | none: no teacher, plain cross-entropy (SFT, specialist teachers)
    source: str = "live"
    # `_target_` node returning the teacher's Hugging Face folder, e.g. distill.models.resolve_model
    model: Any = MISSING
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    attn_implementation: str = "auto"  # auto = flash_attention_2 when installed on GPU, else sdpa
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    threads: int = 1  # torch intra-op threads inside each teacher actor (CPU)
    stages: int = 1  # >1: each replica is a pipeline of this many stage actors (resources split evenly)
    # >1: each stage is this many actors on one node (one GPU each, or CPU), sharding its layers with the
    # model's own tensor-parallel plan (distill/teacher/tensor_parallel.py); must divide its attention
    # heads, key/value heads and MLP channels
    tensor_parallel: int = 1
    placement_strategy: str = "PACK"  # PACK: stages on one node where possible; SPREAD: across nodes
    max_restarts: int = 3  # Ray restarts a dead replica actor this often, re-running its requests
    # run tag of a running pool (`<tag>/teacher-<i>` at ray.address) to use instead of starting one
    attach: str | None = None


@dataclass
class StudentConfig:
    # `_target_` node returning the student's initial Hugging Face folder
    model: Any = MISSING
    gradient_checkpointing: bool = False
    # auto = flash_attention_2 when flash-attn is installed, the rank is on CUDA and trainer.precision is
    # bf16/fp16; sdpa otherwise. Or name one (sdpa, eager, flash_attention_2).
    attn_implementation: str = "auto"


@dataclass
class LossConfig:
    _target_: str = "distill.losses.DistillationLoss"
    divergence: str = "forward_kl"
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    tail: str = "bucket"
    beta: float = 0.5
    alpha: float = 0.1
    chunk_size: int = 1024
    schedule: Any = None


@dataclass
class DataSourceConfig:
    """One named data source of a multi-source run; `routing` maps its name to a teacher."""

    name: str = MISSING
    source: str = MISSING  # as data.source: a builtin corpus name or a path
    format: str = "auto"
    text_field: str = "text"
    max_train_sequences: int | None = None  # cap this source's training sequences (balances a mixture)
    # share of every global batch drawn from this source (all sources or none; None: by size, uniform)
    weight: float | None = None


@dataclass
class DataConfig:
    source: str = (
        "pydoc_topics"  # a builtin corpus name, or a path to .txt / .jsonl / .parquet (file or folder)
    )
    # several named sources instead of `source`: each packed separately (every sequence keeps its source,
    # so each token is scored by its source's teacher) and each with its own held-out set
    sources: list[DataSourceConfig] = field(default_factory=list)
    train_sources: list[str] | None = None  # names of `sources` to train on (None: all); all are evaluated
    # auto | text | jsonl | parquet | megatron (.bin/.idx pairs) | completions (prompt + completion, masked)
    format: str = "auto"
    # completions: text (re-tokenise prompt and completion) | generated (the generator's ids, same tokenizer)
    tokens: str = "text"
    text_field: str = "text"
    seq_len: int = 256
    heldout_fraction: float = 0.1
    max_train_sequences: int | None = None
    heldout_sequences: int = 16
    seed: int = 0
    tokenize_workers: int = 1  # processes that tokenise a raw source on first use (launch.tokenize: workers)
    # attention stays inside each EOS-separated document of a packed window, positions restart per
    # document (distill/documents.py); the student and the teachers this run starts alike. Ignored for
    # format=completions. Off by default until caches and attached pools record it (see validate).
    document_isolation: bool = False


@dataclass
class TrainerConfig:
    zero_stage: int = 2
    num_ranks: int = 2  # data-parallel student ranks launched locally (Slurm: one per task)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    max_steps: int = 100
    stop_at_step: int | None = (
        None  # end this job early (checkpoint first); the schedule still spans max_steps
    )
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    grad_clip: float = 1.0  # 0 = off
    fused_loss: bool = True  # LM head + loss in token chunks: never the full [tokens x vocab] logits
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str = "off"  # off | latest (must exist) | auto (if one exists)
    eval_every: int = 50
    log_every: int = 5
    threads_per_rank: int = 1
    seed: int = 0
    dist_backend: str = "auto"  # auto = nccl on GPU, gloo on CPU
    # GPUs for the student ranks of a local run (one per rank; distill/placement.py): None = one per rank
    # from those the local teacher pool does not take (CPU when none are left), 0 = CPU
    gpus: int | None = None
    record_samples: bool = False  # audit trail: samples/rank<r>.jsonl, the sample ids of every micro-batch
    # keys a resumed run may change from its recorded config (RESUME_CHANGES; see distill/rundir.py, README)
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class StreamConfig:
    topk: int = 64
    prefetch: int = 2
    values_dtype: str = "float16"  # float16 | bfloat16 | float32
    # none | zstd (lossless) | hybrid | hybrid_coarse (lossy): how replies are encoded (distill/codecs.py)
    codec: str = "none"
    # topk | sample | topk_sample: which of the teacher's tokens a reply carries (teacher/sparsify.py);
    # the sampled schemes draw `samples` tokens per position (topk_sample: besides the top `topk`)
    sparsifier: str = "topk"
    samples: int = 0
    timeout_s: float = 600.0  # a reply slower than this is logged as slow (again at 2x, 4x, ...)
    max_wait_s: float = 3600.0  # ... and given up on after this long in all, while its replica is alive


@dataclass
class FeatureConfig:
    """Hidden-state (feature) distillation, added to the KD loss; off while `layer_map` is None.

    Layer j means the output of decoder layer j (Hugging Face `hidden_states[j + 1]`; for the last layer
    that is the output after the final norm). `layer_map` maps student layer -> teacher layer: a mapping
    {0: 1, 1: 3}, a list [1, 3] (position = student layer), pairs "0:1,1:3" or a rule in i such as
    "2i+1". Each mapped student layer gets a learned Linear(student width, teacher width).
    """

    layer_map: Any = None
    loss: str = "mse"  # mse | cosine
    weight: float = 1.0


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "distill"
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    name: str | None = None


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray runtime in-process; "auto" or host:port joins one
    num_cpus: int | None = None
    namespace: str = "distill"  # teacher actors are named <run tag>/teacher-<i> inside it


@dataclass
class CacheConfig:
    """A teacher-signal cache (distill/cache/): written by `python -m launch.cache`, read by `teacher=cached`.

    Training reads only `path`; the other keys shape a cache when it is written (the manifest records them).
    """

    path: str | None = None  # the cache folder (manifest.json + shards)
    values_dtype: str = "float16"  # float16 | bfloat16 | float32 | int8 (8-bit codes, per-row min/max)
    codec: str = "none"  # as stream.codec: none | zstd | hybrid | hybrid_coarse, each row encoded on its own
    hidden_layers: list[int] | None = None  # teacher layers whose hidden states are stored too (features)
    shard_sequences: int = 256  # sequences per shard file: the unit of resume and of checksums
    batch_size: int = 8  # sequences per teacher request
    # convert the top-k `launch.generate store=topk` stored (data=completions on its folder): no teacher pass
    from_generation: bool = False


@dataclass
class LaunchConfig:
    # local: this process starts the teacher pool and the student ranks | prepare: check everything and
    # write the run directory, then exit (the Slurm scripts run the other steps on their nodes)
    mode: str = "local"


@dataclass
class EnsembleConfig:
    """A per-token mixture of teachers that share a tokenizer (see distill/stream/ensemble.py)."""

    members: list[str] = MISSING  # names in `teachers`
    weights: list[float] | None = None  # fixed weights (normalised); None = equal
    weighting: str = "fixed"  # fixed | confidence (per token, proportional to each teacher's max prob)


@dataclass
class PhaseConfig:
    """One phase of a curriculum: trains from the previous phase's final checkpoint."""

    name: str = MISSING
    max_steps: int = MISSING
    sources: list[str] | None = None  # data sources trained on in this phase (None: all)
    routing: dict[str, str] | None = None  # source -> teacher/ensemble (None: the top-level routing)
    teachers: list[str] | None = None  # teachers started for this phase (None: those its routing uses)
    loss: dict[str, Any] | None = None  # keys merged over the top-level `loss`
    trainer: dict[str, Any] | None = None  # keys merged over the top-level `trainer` (e.g. lr, stop_at_step)
    reset_optimizer: bool = False  # False: keep the previous phase's optimizer state; True: fresh optimizer


@dataclass
class SpeedConfig:
    """How the evaluation report measures each model's speed and memory (distill/report/speed.py)."""

    prompt_len: int = 128  # tokens per prompt: the prefill and the prompt generation starts from
    new_tokens: int = 32  # greedy tokens generated per prompt (>= 2: decode speed is timed between them)
    batch: int = 1  # prompts at once
    repeats: int = 5  # timed runs of each measurement (their median is reported)
    warmup: int = 1  # untimed runs before them
    seed: int = 0  # of the random prompt ids
    threads: int | None = None  # CPU: torch intra-op threads while measuring (None: torch's default)
    # each model measured in a new process: its peak memory is its own (in this process, memory an earlier
    # model freed can be reused unseen); false saves a process start per model
    fresh_process: bool = True


@dataclass
class SimilarityConfig:
    """Output similarity (distill/report/similarity.py): teacher and student generate from the same held-out
    prompts with the same decoding settings; the student's outputs are scored against the teacher's."""

    enabled: bool = True
    # a .jsonl (a "prompt" per line) or .txt file of instruction prompts, sent through the chat template;
    # null: the first `prompt_tokens` tokens of held-out rows, continued as plain text
    prompts: str | None = None
    count: int = 16  # prompts (fewer when there are fewer)
    prompt_tokens: int = 32  # held-out prompts only: tokens of each
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # prompt i draws from its own generator seeded from (seed, i): any batch size, same outputs
    batch: int = 8
    judge: str | None = None  # a local causal LM folder (or builtin name) that scores semantic agreement


@dataclass
class ReportConfig:
    """What the evaluation report measures (`python -m launch.evaluate`, or a training run's end)."""

    # training only: evaluate the exported student against the run's teacher when the run ends, into
    # <run_dir>/report (launch.evaluate does the same for any list of students)
    enabled: bool = False
    sequences: int = 16  # held-out rows of the distribution metrics (fewer when the split has fewer)
    seq_len: int = 256  # tokens per row
    # position buckets of the per-position metrics (position t of T: bucket t * buckets // T)
    buckets: int = 4
    # rows per forward (fewer when their float64 log-probs exceed EVAL_CHUNK_BYTES)
    micro_batch: int = 8
    device: str = "auto"  # auto (the current GPU, else CPU) | cpu | cuda | cuda:<index>
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)  # read with teacher=cached (`cache.path`)
    # several teachers (distill/stream/routing.py): name -> keys merged over `teacher` (model, replicas, ...)
    teachers: dict[str, Any] = field(default_factory=dict)
    ensembles: dict[str, EnsembleConfig] = field(default_factory=dict)
    routing: dict[str, str] = field(default_factory=dict)  # data source name -> teacher or ensemble name
    curriculum: list[PhaseConfig] = field(default_factory=list)  # ordered phases (launch/curriculum.py)
    report: ReportConfig = field(default_factory=ReportConfig)  # report.enabled: evaluate at the run's end
    run_dir: str | None = None  # None: Hydra's output directory


@dataclass
class PlanConfig:
    """`python -m launch.plan`: the hardware and rates a capacity plan assumes (distill/plan.py)."""

    gpu_memory_gib: float = 80.0  # per GPU (H100 80 GB; H200: 141)
    usable_fraction: float = 0.9  # of it, for weights, states and activations (the rest: runtime, NCCL)
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100/H200 SXM)
    teacher_mfu: float = 0.4  # model FLOPs utilisation of the teacher's forward
    student_mfu: float = 0.35  # ... and of the student's training step
    student_gpus: int = 8
    gpus_per_node: int = 8  # a tensor-parallel group stays within one node
    tp_bus_gbs: float = 360.0  # all-reduce bus bandwidth within a node, GB/s (nccl-tests busbw; H100 NVLink)
    network_gbs: float = 50.0  # between nodes per GPU, GB/s (400 Gb/s InfiniBand): pipeline hops
    # measured rates, when known (they replace the MFU estimates): tokens/s per GPU
    teacher_tokens_per_s_per_gpu: float | None = None
    student_tokens_per_s_per_gpu: float | None = None
    tokens: float | None = None  # training tokens, for the run's hours and GPU-hours


@dataclass
class PlanRunConfig(DistillConfig):
    plan: PlanConfig = field(default_factory=PlanConfig)


@dataclass
class CacheRunConfig:
    """`python -m launch.cache`: the teacher, data and top-k of a training run, plus where the cache goes."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class SamplingConfig:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 64
    n: int = 1  # completions per prompt
    seed: int = 0  # sample j of prompt i is drawn from (seed, i, j): the same for any batching or resume


@dataclass
class GenerateConfig:
    """`python -m launch.generate`: the teacher's completions for a prompt file (hard-label distillation)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: str = MISSING  # .jsonl with a "prompt" field, or .txt with one prompt per line
    out: str = MISSING  # output folder (generation.json + parquet parts); a rerun resumes it
    batch_size: int = 8  # prompts per teacher request
    store: str = "none"  # none | topk: also keep the teacher's top-k log-probs on every completion token
    topk: int = 20
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class TokenizeRunConfig:
    """`python -m launch.tokenize`: a corpus in, Megatron-format shards out (distill/data/tokenize.py)."""

    source: str = MISSING  # a folder or file of .txt/.md/.rst/.jsonl/.parquet or Megatron .bin/.idx pairs
    out: str = MISSING  # the tokenised dataset's folder; a rerun with the same settings resumes it
    tokenizer: str = MISSING  # a model or tokenizer folder (the student's: its ids are what it trains on)
    format: str = "auto"
    text_field: str = "text"
    heldout_fraction: float = 0.01  # documents held out for evaluation, chosen by a keyed hash of the text
    split_seed: int = 0
    shard_bytes: int = 256 * 2**20  # input bytes per shard: the unit of parallelism and of resume
    workers: int = 1  # processes on this node
    task: int | None = None  # this task's index (None: $SLURM_ARRAY_TASK_ID, else 0)
    num_tasks: int | None = None  # tasks sharing the job, e.g. a Slurm array (None: its task count, else 1)
    verify: bool = False  # instead of tokenising: re-hash every shard against the manifest (parallel)


@dataclass
class EvaluateConfig:
    """`python -m launch.evaluate`: students against their teacher on held-out text, one report."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the held-out text: this data's held-out split
    students: list[str] = field(default_factory=list)  # Hugging Face folders (e.g. a run's student/)
    report_dir: str = MISSING  # metrics.json, report.md and the plots go here
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # the report's tables and plots to W&B
    report: ReportConfig = field(default_factory=ReportConfig)


def register_configs() -> None:
    """Register the schema so Hydra type-checks every composed config against it."""
    ConfigStore.instance().store(name="distill_schema", node=DistillConfig)
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
    ConfigStore.instance().store(name="cache_schema", node=CacheRunConfig)
    ConfigStore.instance().store(name="plan_schema", node=PlanRunConfig)
    ConfigStore.instance().store(name="tokenize_schema", node=TokenizeRunConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; choose one of {', '.join(map(str, allowed))}.")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}.")


def _codecs() -> tuple[str, ...]:
    """stream.codec's choices, imported when validating: torch and zstd stay out of processes that only read
    configs (the tokeniser's workers run under memory caps)."""
    from distill.codecs import CODECS

    return CODECS


def check_sparsifier(cfg: DictConfig) -> None:
    """A sampled teacher (stream.sparsifier sample / topk_sample) estimates forward KL at temperature 1
    from the live teacher; refuse what it cannot serve, naming the fix."""
    from distill.teacher.sparsify import SPARSIFIERS  # here: torch stays out of config-only processes

    s = cfg.stream
    _choice("stream.sparsifier", s.sparsifier, SPARSIFIERS)
    if s.sparsifier == "topk":
        if s.samples:
            raise ConfigError(
                f"stream.samples={s.samples} is only read by stream.sparsifier=sample or topk_sample; "
                "set one of them, or stream.samples=0."
            )
        return
    _at_least("stream.samples", s.samples, 1)
    loss = cfg.loss
    schedule = dict(loss.get("schedule") or {})
    if (
        loss.get("divergence") != "forward_kl"
        or loss.get("temperature", 1.0) != 1.0
        or "temperature" in schedule
    ):
        raise ConfigError(
            f"stream.sparsifier={s.sparsifier} gives an unbiased estimate of forward KL at temperature 1 "
            f"only; the loss is {loss.get('divergence')} at temperature {loss.get('temperature')}"
            f"{' (scheduled)' if 'temperature' in schedule else ''}: use loss=forward_kl or loss=kd_ce with "
            f"loss.temperature=1, or stream.sparsifier=topk."
        )
    if cfg.teacher.get("source") == "none":
        raise ConfigError(
            f"stream.sparsifier={s.sparsifier} needs a teacher (teacher=none trains on the labels alone); "
            "drop stream.sparsifier or pick a teacher."
        )
    if cfg.get("ensembles"):
        raise ConfigError(
            f"stream.sparsifier={s.sparsifier} does not mix across ensemble members (their draws differ); "
            "use stream.sparsifier=topk with ensembles."
        )


def validate(cfg: DictConfig) -> None:
    """Range and cross-field checks that types alone cannot express."""
    t, s, d, st = cfg.trainer, cfg.stream, cfg.data, cfg.student
    if st.model is MISSING or (cfg.teacher.model is MISSING and cfg.teacher.source != "none"):
        raise ConfigError("teacher.model and student.model must be set (pick teacher=... student=...).")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"trainer.zero_stage={t.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3.")
    _choice("trainer.precision", t.precision, ("fp32", "bf16", "fp16"))
    _choice("trainer.optimizer", t.optimizer, ("adamw", "sgd"))
    _choice("trainer.resume", str(t.resume), ("off", "latest", "auto"))
    _choice("trainer.dist_backend", t.dist_backend, ("auto", "gloo", "nccl"))
    for key in t.allow_changes:
        _choice("trainer.allow_changes entry", key, RESUME_CHANGES)
    for key in (
        "num_ranks",
        "max_steps",
        "micro_batch_size",
        "grad_accum_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "log_every",
        "threads_per_rank",
    ):
        _at_least(f"trainer.{key}", t[key], 1)
    _at_least("trainer.warmup_steps", t.warmup_steps, 0)
    if t.lr <= 0:
        raise ConfigError(f"trainer.lr={t.lr} must be > 0.")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"trainer.min_lr_ratio={t.min_lr_ratio} must be in [0, 1].")
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.max_steps:
        raise ConfigError(
            f"trainer.stop_at_step={t.stop_at_step} must be in [1, trainer.max_steps={t.max_steps}]."
        )
    _at_least("stream.topk", s.topk, 1)
    if s.prefetch < 1:
        raise ConfigError(f"stream.prefetch={s.prefetch} must be >= 1 (1 = request one micro-batch ahead).")
    _choice("stream.values_dtype", s.values_dtype, ("float16", "bfloat16", "float32"))
    _choice("stream.codec", s.codec, _codecs())
    check_sparsifier(cfg)
    _at_least("stream.timeout_s", s.timeout_s, 1)
    if s.max_wait_s < s.timeout_s:
        raise ConfigError(
            f"stream.max_wait_s={s.max_wait_s} must be >= stream.timeout_s={s.timeout_s} (the total wait for "
            f"one reply from a live teacher, of which timeout_s is the first interval)."
        )
    _at_least("data.seq_len", d.seq_len, 2)
    _at_least("data.heldout_sequences", d.heldout_sequences, 1)
    if not 0 < d.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={d.heldout_fraction} must be strictly between 0 and 1.")
    _choice("data.format", d.format, ("auto", "text", "jsonl", "parquet", "megatron", "completions"))
    _choice("data.tokens", d.tokens, ("text", "generated"))
    _at_least("data.tokenize_workers", d.tokenize_workers, 1)
    weights = [s.weight for s in d.sources]
    if any(w is not None for w in weights) and (
        None in weights or any(w < 0 for w in weights) or not sum(weights)
    ):
        raise ConfigError(
            f"data.sources weights {weights}: give every source a weight >= 0 (not all 0), or none of them "
            f"(then sources mix by size)."
        )
    _choice("teacher.source", cfg.teacher.source, ("live", "cached", "none"))
    _at_least("teacher.replicas", cfg.teacher.replicas, 1)
    _at_least("teacher.threads", cfg.teacher.threads, 1)
    _at_least("teacher.stages", cfg.teacher.stages, 1)
    _at_least("teacher.tensor_parallel", cfg.teacher.tensor_parallel, 1)
    _at_least("teacher.max_restarts", cfg.teacher.max_restarts, 0)
    _choice(
        "teacher.placement_strategy",
        cfg.teacher.placement_strategy,
        ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    )
    _choice("features.loss", cfg.features.loss, ("mse", "cosine"))
    _at_least("features.weight", cfg.features.weight, 0)
    _choice("logger.backend", cfg.logger.backend, ("wandb", "none"))
    _choice("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    _choice("launch.mode", cfg.launch.mode, ("local", "prepare"))
    if cfg.teachers or cfg.curriculum or d.sources:
        from distill.stream.routing import validate_routing

        validate_routing(cfg)
    if cfg.teacher.attach is not None and cfg.ray.address is None:
        raise ConfigError(
            f"teacher.attach={cfg.teacher.attach} needs ray.address=host:port of the pool's Ray cluster."
        )


def validate_cache(cfg: DictConfig) -> None:
    """Checks for `launch.cache` (its config has no student or trainer)."""
    c = cfg.cache
    if not c.path:
        raise ConfigError("cache.path is not set; give the folder to write the cache to: cache.path=/path.")
    if cfg.teacher.model is MISSING:
        raise ConfigError("teacher.model must be set (pick teacher=smollm2 or teacher=local ...).")
    _choice("cache.values_dtype", c.values_dtype, ("float16", "bfloat16", "float32", "int8"))
    _choice("cache.codec", c.codec, _codecs())
    if c.codec != "none" and c.values_dtype == "int8":
        raise ConfigError(
            f"cache.codec={c.codec} encodes the log-probs itself; it does not combine with "
            f"cache.values_dtype=int8 (pick one: cache.codec=hybrid_coarse is smaller and closer to fp32)."
        )
    _at_least("cache.shard_sequences", c.shard_sequences, 1)
    _at_least("cache.batch_size", c.batch_size, 1)
    _at_least("stream.topk", cfg.stream.topk, 1)
    _at_least("stream.prefetch", cfg.stream.prefetch, 1)
    _at_least("data.seq_len", cfg.data.seq_len, 2)
    _at_least("teacher.replicas", cfg.teacher.replicas, 1)
    _at_least("teacher.stages", cfg.teacher.stages, 1)
    _at_least("teacher.tensor_parallel", cfg.teacher.tensor_parallel, 1)


def validate_tokenize(cfg: DictConfig) -> None:
    """Checks for `launch.tokenize`."""
    _choice("format", cfg.format, ("auto", "text", "jsonl", "parquet", "megatron"))
    if not 0 <= cfg.heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction={cfg.heldout_fraction} must be in [0, 1).")
    _at_least("shard_bytes", cfg.shard_bytes, 1)
    _at_least("workers", cfg.workers, 1)
    _at_least("num_tasks", cfg.num_tasks, 1)
    if not 0 <= cfg.task < cfg.num_tasks:
        raise ConfigError(f"task={cfg.task} must be in [0, num_tasks={cfg.num_tasks}).")


def build(node):
    """`hydra.utils.instantiate`, surfacing our own error (which names the fix) instead of Hydra's wrapper;
    a plain ValueError (a builder rejecting an argument) becomes a ConfigError naming the config node."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        if type(e.__cause__) is ValueError:
            raise ConfigError(f"{node._get_full_key(None)}: {e.__cause__}") from None
        if isinstance(e.__cause__, ValueError | OSError):
            raise e.__cause__ from None
        raise


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_run_config(run_dir) -> DictConfig:
    """The resolved config of a run directory's latest start (`config.yaml`, or the newest
    `config-history/start-<n>.yaml` a resume with changed settings wrote), re-checked against the schema."""
    from distill.rundir import effective_config_path

    saved = OmegaConf.load(effective_config_path(run_dir))
    cfg = OmegaConf.merge(OmegaConf.structured(DistillConfig), saved)
    validate(cfg)
    return cfg
