"""Phases of training (`curriculum:`), e.g. sequential expert specialisation: expert A, then expert B.

Each phase is one ordinary run in `<run dir>/phase-<i>-<name>/` with the top-level config changed by the
phase (its sources, routing, teachers, loss and trainer keys, `trainer.max_steps = max_steps`). The
driver runs them in order; `launch.train.run` starts the phase's teachers and shuts them down — waiting
until Ray has released every actor — before the next phase's teachers start. Phase i > 0 begins from
phase i-1's final checkpoint (`phase.json`): its weights, and its optimizer state unless
`reset_optimizer`; the LR schedule and step count start afresh.

`curriculum.json` in the run directory records each phase's state. A run stopped mid-phase (preempted:
SIGUSR1 to the driver, which then exits with 75; or `trainer.stop_at_step` in a phase's `trainer:`) and
started again with `trainer.resume=auto` skips the finished phases and resumes the interrupted one from
its own newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from distill.config import ConfigError, validate
from distill.rundir import check_start, record_start
from distill.stream.routing import members, used_teachers
from distill.student import checkpoint
from launch.preemption import Preempted

log = logging.getLogger("distill")


def phase_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / f"phase-{index}-{name}"


def phase_config(cfg: DictConfig, index: int) -> DictConfig:
    """The config of one phase: an ordinary (non-curriculum) run."""
    phase = cfg.curriculum[index]
    c = OmegaConf.merge(cfg, {"curriculum": []})
    with open_dict(c):
        if phase.sources is not None:
            c.data.train_sources = list(phase.sources)
        if phase.routing is not None:
            c.routing = OmegaConf.to_container(phase.routing)
        if phase.loss:
            c.loss = OmegaConf.merge(c.loss, phase.loss)
        if phase.trainer:
            c.trainer = OmegaConf.merge(c.trainer, phase.trainer)
        c.trainer.max_steps = phase.max_steps
        if cfg.teachers:  # only this phase's teachers run; routes to the others are dropped
            started = list(phase.teachers) if phase.teachers is not None else used_teachers(c)
            c.teachers = {n: cfg.teachers[n] for n in cfg.teachers if n in started}
            c.ensembles = {n: e for n, e in cfg.ensembles.items() if set(e.members) <= set(started)}
            c.routing = {s: t for s, t in c.routing.items() if set(members(cfg, t)) <= set(started)}
    validate(c)
    return c


def run_curriculum(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the phases in order, skipping finished ones; returns a summary over all phases."""
    from launch.train import run

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.launch.mode != "local":
        raise ConfigError(
            "curriculum runs are driven locally (launch.mode=local); Slurm phases are not wired."
        )
    if cfg.teacher.attach:
        raise ConfigError(
            "teacher.attach cannot be used with a curriculum: each phase starts its own teachers."
        )
    phases = [phase_config(cfg, i) for i in range(len(cfg.curriculum))]  # every phase checked up front
    resume = str(cfg.trainer.resume)
    # one curriculum per run dir: resume=off over an earlier one is refused, a rerun must keep its settings
    record_start(check_start(cfg, run_dir, None), cfg)
    state_path = run_dir / "curriculum.json"
    state = json.loads(state_path.read_text()) if resume != "off" and state_path.is_file() else {"phases": []}

    summaries = []
    for i, (phase, pcfg) in enumerate(zip(cfg.curriculum, phases, strict=True)):
        pdir = phase_dir(run_dir, i, phase.name)
        record = state["phases"][i] if i < len(state["phases"]) else None
        if record and record["status"] == "done":
            log.info("phase %d (%s) already done: %s", i, phase.name, pdir)
            summaries.append(record["summary"])
            continue
        pdir.mkdir(parents=True, exist_ok=True)
        if i > 0:
            previous = phase_dir(run_dir, i - 1, cfg.curriculum[i - 1].name) / "checkpoints"
            init = checkpoint.latest(previous)
            if init is None:
                raise ConfigError(
                    f"phase {i} ({phase.name}) needs phase {i - 1}'s final checkpoint in {previous}."
                )
            info = {"name": phase.name, "init_from": str(init), "reset_optimizer": phase.reset_optimizer}
            (pdir / "phase.json").write_text(json.dumps(info, indent=1))
        pcfg.trainer.resume = "off" if resume == "off" else "auto"  # an interrupted phase continues
        log.info(
            "phase %d (%s): %d steps on %s", i, phase.name, phase.max_steps, phase.sources or "all sources"
        )
        state["phases"] = state["phases"][:i] + [{"name": phase.name, "dir": str(pdir), "status": "running"}]
        _write(state_path, state)
        started = time.time()
        try:
            summary = run(pcfg, pdir)
        except Preempted as e:  # SIGUSR1: the phase's teachers are shut down; the rerun resumes this phase
            state["phases"][i].update(status="preempted", step=e.step)
            _write(state_path, state)
            raise Preempted(e.step, f"{i} ({phase.name})") from None
        summary["eval"] = _last_eval(pdir)
        export = pdir / "student"
        done = export.is_dir() and export.stat().st_mtime >= started  # exported by this run, not a stale one
        state["phases"][i].update(status="done" if done else "stopped", summary=summary)
        _write(state_path, state)
        summaries.append(summary)
        if not done:
            log.info("stopped in phase %d (%s); rerun with trainer.resume=auto to continue it", i, phase.name)
            break
    return {
        "before": summaries[0]["before"],
        "after": summaries[-1]["after"],
        "steps": sum(s["steps"] for s in summaries),
        "tokens_per_s": sum(s["tokens_per_s"] for s in summaries) / len(summaries),
        "teacher_wait_fraction": sum(s["teacher_wait_fraction"] for s in summaries) / len(summaries),
        "bytes_per_token": summaries[-1]["bytes_per_token"],
        "student": summaries[-1]["student"] if len(summaries) == len(phases) else None,
        "run_dir": str(run_dir),
        "phases": [{"name": p.name, "eval": s["eval"]} for p, s in zip(cfg.curriculum, summaries)],
    }


def _last_eval(pdir: Path) -> dict:
    """The phase's final evaluation: every domain against every teacher of the phase."""
    records = [json.loads(line) for line in (pdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/kl" in r]
    return {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}


def _write(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)
