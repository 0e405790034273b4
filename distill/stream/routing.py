"""Several teachers behind one stream: each data source is scored by its own teacher (or ensemble).

Config (schema in distill/config.py):

    teachers:   {name: {model: ..., replicas: ..., stages: ...}}   keys merged over `teacher`
    ensembles:  {name: {members: [teacher, ...], weights: [...], weighting: fixed|confidence}}
    data.sources: [{name, source, ...}]                           every packed sequence keeps its source
    routing:    {source name: teacher or ensemble name}

`RoutedTeacherStream` has the interface of `TeacherStream` (`stream(batches, input_ids_of)`, `stats`):
it splits each micro-batch's rows by their source's target, streams each part through that target's own
`TeacherStream` (so every teacher keeps its prefetch, replicas and fault handling) and reassembles the
replies in row order. A micro-batch may mix sources freely.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from distill.stream.client import StreamStats, TeacherStream
from distill.stream.ensemble import WEIGHTINGS, mix_full_log_probs, mix_outputs
from distill.teacher.actor import TeacherOutput
from distill.teacher.sparsify import sparsifier_of


def merged_stats(parts: list[StreamStats]) -> StreamStats:
    """One StreamStats over several streams: numbers summed, per-replica lists concatenated."""
    total = copy.deepcopy(parts[0])
    for part in parts[1:]:
        for f in dataclasses.fields(total):
            a, b = getattr(total, f.name), getattr(part, f.name)
            setattr(total, f.name, a + b)  # int/float add, lists concatenate
    return total


class EnsembleStream:
    """Teachers sharing a tokenizer, mixed per token on their top-k (distill/stream/ensemble.py)."""

    def __init__(self, members: list[TeacherStream], weights: list[float] | None, weighting: str):
        self.members, self.weights, self.weighting = members, weights, weighting
        self.topk = members[0].topk

    @property
    def stats(self) -> StreamStats:
        return merged_stats([m.stats for m in self.members])

    def stream(self, batches: Iterable[Any], input_ids_of) -> Iterator[tuple[Any, TeacherOutput]]:
        copies = itertools.tee(batches, len(self.members))
        streams = [m.stream(c, input_ids_of) for m, c in zip(self.members, copies, strict=True)]
        for i, replies in enumerate(zip(*streams, strict=True)):
            outputs = [out for _, out in replies]
            yield replies[0][0], mix_outputs(outputs, i, self.topk, self.weights, self.weighting)

    def full_log_probs(self, input_ids: np.ndarray, start: int = 0) -> np.ndarray:
        members = [m.full_log_probs(input_ids, start) for m in self.members]
        return mix_full_log_probs(members, self.weights, self.weighting)


class RoutedTeacherStream:
    """Rows of a micro-batch go to their source's target; replies come back reassembled in row order.

    `targets[name]` is a TeacherStream or EnsembleStream; `route[s]` the target name of source id s;
    `sources_of(batch)` the source id of every row of a batch. `rows_per_target` counts rows sent.
    """

    def __init__(self, targets: dict[str, Any], route: list[str], sources_of: Callable[[Any], np.ndarray]):
        self.targets, self.route, self.sources_of = targets, route, sources_of
        self.rows_per_target = dict.fromkeys(targets, 0)
        unique = {id(s): s for t in targets.values() for s in getattr(t, "members", [t])}
        self._streams = list(unique.values())  # each teacher's stream once, even if also in an ensemble

    @property
    def stats(self) -> StreamStats:
        return merged_stats([s.stats for s in self._streams])

    @property
    def eval_bytes(self) -> int:
        return sum(s.eval_bytes for s in self._streams)

    def stream(self, batches: Iterable[Any], input_ids_of) -> Iterator[tuple[Any, TeacherOutput]]:
        """Each target streams its own parts (with its own prefetch); parts are read lazily, in order."""
        source, end = iter(batches), object()
        split: deque = deque()  # (batch, {target: rows}) in batch order, split but not yet yielded
        parts: dict[str, deque] = {name: deque() for name in self.targets}

        def pull() -> bool:
            batch = next(source, end)
            if batch is end:
                return False
            by_target = self._split(self.sources_of(batch))
            split.append((batch, by_target))
            for name, rows in by_target.items():
                parts[name].append((batch, rows))
            return True

        def parts_of(name: str) -> Iterator:
            while parts[name] or pull():
                if parts[name]:
                    yield parts[name].popleft()

        replies = {
            name: target.stream(parts_of(name), lambda part: input_ids_of(part[0])[part[1]])
            for name, target in self.targets.items()
        }
        while split or pull():
            batch, by_target = split.popleft()
            outputs = {name: next(replies[name])[1] for name in by_target}
            for name, rows in by_target.items():
                self.rows_per_target[name] += len(rows)
            yield batch, reassemble(outputs, by_target, len(self.sources_of(batch)))

    def _split(self, sources: np.ndarray) -> dict[str, np.ndarray]:
        by_target: dict[str, list[int]] = {}
        for row, s in enumerate(np.asarray(sources)):
            by_target.setdefault(self.route[int(s)], []).append(row)
        return {name: np.asarray(rows) for name, rows in by_target.items()}


def reassemble(outputs: dict[str, TeacherOutput], rows: dict[str, np.ndarray], n: int) -> TeacherOutput:
    """One reply for the whole micro-batch: each target's rows put back where they came from."""
    first = next(iter(outputs.values()))
    values = np.empty((n, *first.values.shape[1:]), first.values.dtype)
    indices = np.empty((n, *first.indices.shape[1:]), first.indices.dtype)
    offset = None if first.offset is None else np.empty((n, *first.offset.shape[1:]), np.float32)
    for name, out in outputs.items():
        values[rows[name]], indices[rows[name]] = out.values, out.indices
        if offset is not None:  # sampled sparsifiers: every teacher's reply carries its KL offsets
            offset[rows[name]] = out.offset
    return TeacherOutput(
        first.request_id,
        values,
        indices,
        first.values_dtype,
        compute_s=sum(o.compute_s for o in outputs.values()),
        offset=offset,
    )


# ---- config: named teachers, what a run or phase uses, checks ----


def teacher_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each named teacher's full config: its keys merged over the `teacher` group's."""
    from distill.config import ConfigError, TeacherConfig

    out = {}
    for name, entry in cfg.teachers.items():
        try:
            out[name] = OmegaConf.merge(OmegaConf.structured(TeacherConfig), cfg.teacher, entry)
        except Exception as e:  # unknown key or wrong type in the entry
            raise ConfigError(f"teachers.{name}: {e}".splitlines()[0]) from None
    return out


def source_names(cfg: DictConfig) -> list[str]:
    return [s.name for s in cfg.data.sources]


def trained_sources(cfg: DictConfig) -> list[str]:
    return list(cfg.data.train_sources) if cfg.data.train_sources is not None else source_names(cfg)


def members(cfg: DictConfig, target: str) -> list[str]:
    """The teachers a routing target needs: itself, or an ensemble's members."""
    return list(cfg.ensembles[target].members) if target in cfg.ensembles else [target]


def used_teachers(cfg: DictConfig) -> list[str]:
    """Teachers the routing of the trained sources needs, in `teachers` order."""
    needed = {t for s in trained_sources(cfg) for t in members(cfg, cfg.routing[s])}
    return [name for name in cfg.teachers if name in needed]


def validate_routing(cfg: DictConfig) -> None:
    """Names that must match up: sources, teachers, ensembles, routing, phases."""
    from distill.config import ConfigError

    names = source_names(cfg)
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources names must be unique, got {names}.")
    if cfg.data.train_sources is not None:
        _known(cfg.data.train_sources, names, "data.train_sources")
    if cfg.teachers or cfg.routing:
        if not names:
            raise ConfigError("routing by source needs data.sources: [{name: ..., source: ...}, ...].")
        teacher_configs(cfg)
        for name, ens in cfg.ensembles.items():
            if name in cfg.teachers:
                raise ConfigError(f"ensembles.{name} has the name of a teacher; rename one of them.")
            unknown = [m for m in ens.members if m not in cfg.teachers]
            if unknown or len(ens.members) < 2:
                raise ConfigError(
                    f"ensembles.{name}.members={list(ens.members)} must name at least 2 teachers of "
                    f"`teachers` ({', '.join(cfg.teachers)})."
                )
            if ens.weights is not None and (len(ens.weights) != len(ens.members) or min(ens.weights) <= 0):
                raise ConfigError(f"ensembles.{name}.weights needs one positive weight per member.")
            if ens.weighting not in WEIGHTINGS:
                raise ConfigError(f"ensembles.{name}.weighting={ens.weighting!r}: use fixed or confidence.")
        _check_routing(cfg.routing, names, trained_sources(cfg), cfg, "routing")
        if cfg.features.layer_map is not None:
            raise ConfigError(
                "feature distillation (features.layer_map) works with one teacher, not `teachers`."
            )
    for i, phase in enumerate(cfg.curriculum):
        if phase.sources is not None:
            _known(phase.sources, names, f"curriculum.{i}.sources")
        if phase.routing is not None:
            trained = list(phase.sources) if phase.sources is not None else names
            _check_routing(phase.routing, names, trained, cfg, f"curriculum.{i}.routing")
        if phase.teachers is not None:
            _known(phase.teachers, list(cfg.teachers), f"curriculum.{i}.teachers")
        if phase.max_steps < 1:
            raise ConfigError(f"curriculum.{i}.max_steps={phase.max_steps} must be >= 1.")


def _known(given, allowed: list[str], key: str) -> None:
    from distill.config import ConfigError

    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise ConfigError(f"{key} names {unknown}, not among {allowed}.")


def _check_routing(routing, names: list[str], trained: list[str], cfg: DictConfig, key: str) -> None:
    """Every trained source has a teacher or ensemble (sources only evaluated need none)."""
    from distill.config import ConfigError

    _known(list(routing), names, key)
    missing = [n for n in trained if n not in routing]
    if missing:
        raise ConfigError(
            f"{key} maps no teacher to data source(s) {missing}; add `{missing[0]}: <teacher>`."
        )
    targets = [*cfg.teachers, *cfg.ensembles]
    for source, target in routing.items():
        if target not in targets:
            raise ConfigError(f"{key}.{source}={target!r} is neither a teacher nor an ensemble ({targets}).")


# ---- ranks: attach to the teachers' pools, build the stream ----


def open_routed_stream(cfg: DictConfig, run_tag: str, sources_of: Callable) -> RoutedTeacherStream:
    """Attach to every teacher the run's routing uses and build the routed stream (in a student rank)."""
    from distill.teacher import TeacherPool
    from distill.teacher.pool import pool_tag

    tcs = teacher_configs(cfg)
    s = cfg.stream

    def single(name: str) -> TeacherStream:
        pool = TeacherPool.attach(pool_tag(run_tag, name), tcs[name].replicas, tcs[name].stages)
        return TeacherStream(
            pool.actors,
            s.topk,
            s.prefetch,
            s.values_dtype,
            s.timeout_s,
            max_wait_s=s.max_wait_s,
            codec=s.codec,
            sparsifier=sparsifier_of(s, cfg.data.seed),
        )

    streams = {name: single(name) for name in cfg.teachers}  # the teachers started for this run/phase
    targets: dict[str, Any] = {}
    for target in dict.fromkeys(cfg.routing.values()):
        if target in cfg.ensembles and all(m in streams for m in cfg.ensembles[target].members):
            ens = cfg.ensembles[target]
            weights = list(ens.weights) if ens.weights is not None else None
            targets[target] = EnsembleStream([streams[m] for m in ens.members], weights, ens.weighting)
        elif target in streams:
            targets[target] = streams[target]
    route = [cfg.routing.get(name) for name in source_names(cfg)]  # None: not trained on
    routed = RoutedTeacherStream(targets, route, sources_of)
    routed.teachers = streams
    return routed


# ---- evaluation: every domain's held-out set, against every teacher of the run ----


def evaluate_domains(model, stream: RoutedTeacherStream, domains: dict[str, np.ndarray], cfg, micro_batch):
    """Per domain: KL / top-1 agreement to each running teacher (and to the domain's ensemble), perplexity.

    `eval/kl`, `top1_agreement`, `teacher_ppl` (and `ppl`) are also given over all domains whose routed
    teacher is running (sequence-weighted), so single-teacher summaries read the same keys.
    """
    from distill.eval import evaluate

    metrics: dict[str, float] = {}
    overall: dict[str, list[tuple[float, int]]] = {}
    for domain, sequences in domains.items():
        target = cfg.routing.get(domain)  # None: its teacher does not run in this phase
        against = dict(stream.teachers)  # never empty: a run or phase starts at least one teacher
        if target in stream.targets and target not in against:
            against[target] = stream.targets[target]  # an ensemble
        for name, teacher in against.items():
            result = evaluate(model, sequences, teacher.full_log_probs, micro_batch)
            metrics[f"{domain}/ppl"] = result["ppl"]
            metrics[f"{domain}/kl_{name}"] = result["kl"]
            metrics[f"{domain}/top1_{name}"] = result["top1_agreement"]
            if name == target:
                for key in ("kl", "top1_agreement", "teacher_ppl"):
                    overall.setdefault(key, []).append((result[key], len(sequences)))
        overall.setdefault("log_ppl", []).append((float(np.log(metrics[f"{domain}/ppl"])), len(sequences)))
    for key, pairs in overall.items():
        mean = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        metrics["ppl" if key == "log_ppl" else key] = float(np.exp(mean)) if key == "log_ppl" else mean
    return metrics
