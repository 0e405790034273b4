"""`python -m launch.tokenize` as a user runs it: killed and rerun, under a real memory cap, trained on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from test_data import file_bytes, pydoc_jsonl
from test_online import ROOT, run_module, tiny_overrides

from distill.data import load_documents


def line_tokenizer(folder: Path) -> Path:
    """A real `tokenizers` tokenizer whose tokens are whole lines of Python's documentation (WordLevel
    over a newline split): a few tokens per kilobyte, so a corpus of hundreds of MB tokenises in seconds
    and the test measures the pipeline's memory, not the BPE's speed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    lines = dict.fromkeys(line for doc in load_documents("pydoc_topics") for line in doc.split("\n"))
    vocab = {"<unk>": 0, "<eos>": 1, **{line: i + 2 for i, line in enumerate(lines)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.CharDelimiterSplit("\n")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return folder


def tokenize_cmd(source: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.tokenize",
        f"source={source}",
        f"out={out}",
        f"tokenizer={tokenizer}",
        *extra,
    ]


def test_tokeniser_killed_midway_resumes_to_identical_shards(tmp_path, tiny_tokenizer_dir):
    pydoc_jsonl(tmp_path / "corpus.jsonl", copies=6)  # ~2.9 MB of real prose, ~30 pieces of 100 kB
    args = ("shard_bytes=100000", "heldout_fraction=0.05")
    reference = run_module(
        "launch.tokenize",
        tokenize_cmd(tmp_path / "corpus.jsonl", tmp_path / "ref", tiny_tokenizer_dir, *args)[3:],
    )
    assert reference.returncode == 0

    cmd = tokenize_cmd(tmp_path / "corpus.jsonl", tmp_path / "out", tiny_tokenizer_dir, *args)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "out" / "done").glob("*.json"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, "the tokeniser finished before it could be killed; give it more input"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "out" / "done").glob("*.json")))
    pieces = len(json.loads((tmp_path / "out" / "plan.json").read_text())["pieces"])
    assert 3 <= done_before < pieces and not (tmp_path / "out" / "manifest.json").exists()

    rerun = run_module("launch.tokenize", cmd[3:])
    assert rerun.returncode == 0
    assert f"{done_before} of {pieces} pieces already done" in rerun.stderr + rerun.stdout
    assert file_bytes(tmp_path / "out") == file_bytes(tmp_path / "ref")  # byte-identical, manifest included


def own_memory_cgroup() -> Path | None:
    """A fresh child of this process's memory cgroup (v2 or v1) that this user may write, or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        else:
            continue
        child = base / f"distill-test-{os.getpid()}-{time.monotonic_ns()}"
        try:
            child.mkdir()
            return child
        except OSError:
            continue
    return None


def run_capped(cmd: list[str], cap: int, cgroup: Path) -> subprocess.CompletedProcess:
    v2 = (cgroup / "memory.max").exists()
    (cgroup / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(cap))
    if not v2 and (cgroup / "memory.memsw.limit_in_bytes").exists():
        (cgroup / "memory.memsw.limit_in_bytes").write_text(str(cap))  # no escape into swap

    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        cmd, cwd=ROOT, env=env, preexec_fn=enter, capture_output=True, text=True, timeout=900
    )


def test_tokeniser_under_a_real_memory_cap_handles_a_corpus_twice_its_size(tmp_path):
    cgroup = own_memory_cgroup()
    if cgroup is None:  # CI runs as root: there a missing cgroup is a failure, never a silent skip
        reason = "no writable memory cgroup (needs root, as in CI)"
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    cap = 112 << 20  # the tokeniser process alone is ~80 MB (Python, numpy, Hydra, the tokenizer)
    try:
        # the cap is real: a process that needs more than it is killed
        hog = run_capped(
            [sys.executable, "-c", f"b = bytearray({cap + (64 << 20)}); b[::4096] = b'x' * len(b[::4096])"],
            cap,
            cgroup,
        )
        assert hog.returncode == -signal.SIGKILL

        corpus = tmp_path / "corpus"
        corpus.mkdir()
        block = tmp_path / "one.jsonl"
        pydoc_jsonl(block, copies=20)
        with open(corpus / "big.jsonl", "wb") as f:
            chunk = block.read_bytes()
            while f.tell() < 2 * cap + (16 << 20):
                f.write(chunk)
        size = (corpus / "big.jsonl").stat().st_size
        tokenizer = line_tokenizer(tmp_path / "lines")
        cmd = tokenize_cmd(corpus, tmp_path / "out", tokenizer, "shard_bytes=33554432")
        capped = run_capped(cmd, cap, cgroup)
        assert capped.returncode == 0, capped.stderr[-3000:]
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert size >= 2 * cap and len(manifest["shards"]["train"]) == -(-size // 33554432)
        docs = manifest["totals"]["train"]["documents"] + manifest["totals"]["heldout"]["documents"]
        assert docs == size // block.stat().st_size * len(load_documents("pydoc_topics")) * 20  # every one
        peak_name = "memory.peak" if (cgroup / "memory.peak").exists() else "memory.max_usage_in_bytes"
        if (cgroup / peak_name).exists():
            assert int((cgroup / peak_name).read_text()) <= cap
    finally:
        cgroup.rmdir()


def test_tokenise_then_train_export_and_resume_through_the_cli(tmp_path, tiny_student_dir):
    pydoc_jsonl(tmp_path / "corpus.jsonl", copies=2)
    out = tmp_path / "tokens"
    made = run_module(
        "launch.tokenize",
        tokenize_cmd(tmp_path / "corpus.jsonl", out, tiny_student_dir, "heldout_fraction=0.1")[3:],
    )
    assert made.returncode == 0

    def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        overrides = tiny_overrides(
            Path("/no/teacher/needed"),
            tiny_student_dir,
            run_dir,
            "teacher.source=none",
            f"data.source={out}",
            "trainer.num_ranks=1",
            "trainer.max_steps=2",
            "trainer.checkpoint_every=1",
            "trainer.eval_every=2",
            *extra,
        )
        return run_module("launch.train", overrides)

    whole = train(tmp_path / "whole")
    assert whole.returncode == 0
    assert "tokenising" not in whole.stderr  # the run read the shards; it tokenised nothing
    spec = json.loads((tmp_path / "whole" / "data" / "dataset.json").read_text())
    assert spec["sources"][0]["path"] == str(out) and not list((tmp_path / "whole" / "data").glob("train*"))

    first = train(tmp_path / "split", "trainer.stop_at_step=1")
    assert first.returncode == 0 and not (tmp_path / "split" / "student").exists()
    second = train(tmp_path / "split", "trainer.resume=latest")
    assert second.returncode == 0
    a = load_file(str(tmp_path / "whole" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
