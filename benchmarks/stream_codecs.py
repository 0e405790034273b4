"""Stream codecs (`stream.codec`, `cache.codec`) on the real teacher: bytes per token, how far each moves
the KD loss from fp32, and encode/decode speed against the teacher's own. Prints one JSON object.

    python benchmarks/stream_codecs.py                   # 24 sequences of 256 pydoc tokens, k = 64
    python benchmarks/stream_codecs.py --sequences 8 --k 32

The teacher is SmolLM2-135M-Instruct in fp32; its top-k is the reference. For each codec and reply size
(tokens per encoded block: one stream reply or one cache row), bytes/token of the packed reply and, for
two students cut from the teacher (layers 10 and 20 dropped; layers 0-3 + 26-29 kept), the mean and max
absolute change per position of the training loss (forward KL on the top-k + tail bucket, float64)
when the teacher's top-k is decoded instead of exact. Encode and decode run on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from distill.codecs import decode, encode, float_bits
from distill.data import load_documents, pack_documents
from distill.models import load_causal_lm, load_tokenizer, smollm2_folder, student_from_teacher

CODECS = [  # (codec, values_dtype)
    ("none", "float32"),
    ("none", "float16"),
    ("none", "bfloat16"),
    ("zstd", "float32"),
    ("zstd", "float16"),
    ("zstd", "bfloat16"),
    ("hybrid", "float16"),
    ("hybrid_coarse", "float16"),
]
STUDENTS = {
    "drop2 (28 of 30 layers)": [j for j in range(30) if j not in (10, 20)],
    "cut8 (layers 0-3, 26-29)": [0, 1, 2, 3, 26, 27, 28, 29],
}


def student_view(logits: torch.Tensor, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(student log-probs at the teacher's top-k ids, student mass outside them), float64."""
    log_q = torch.log_softmax(logits.double(), -1)
    at = log_q.gather(-1, torch.from_numpy(ids.astype(np.int64))).numpy()
    return at, 1 - np.exp(at).sum(-1)


def sparse_kl(log_p: np.ndarray, log_q: np.ndarray, q_tail: np.ndarray) -> np.ndarray:
    """Forward KL over the k ids plus the tail bucket, per position (float64)."""
    log_p = log_p.astype(np.float64)
    p_tail = np.clip(1 - np.exp(log_p).sum(-1), 1e-300, None)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1) + p_tail * (np.log(p_tail) - np.log(q_tail))


def as_float32(values: np.ndarray, values_dtype: str) -> np.ndarray:
    if values_dtype == "bfloat16":
        return torch.from_numpy(values.copy()).view(torch.bfloat16).float().numpy()
    return values.astype(np.float32)


def round_trip(values: np.ndarray, ids: np.ndarray, codec: str, values_dtype: str, rows: int):
    """Decoded values (float32), bytes/token, encode and decode seconds, in blocks of `rows` sequences."""
    out, nbytes, enc_s, dec_s = [], 0, 0.0, 0.0
    for start in range(0, len(values), rows):
        v, i = values[start : start + rows], ids[start : start + rows]
        if codec == "none":
            out.append(as_float32(float_bits(v, values_dtype), values_dtype))
            nbytes += v.size * (2 if values_dtype != "float32" else 4) + i.nbytes
            continue
        t0 = time.perf_counter()
        packed = encode(v, i, codec, values_dtype)
        t1 = time.perf_counter()
        got, got_ids = decode(packed)
        dec_s += time.perf_counter() - t1
        enc_s += t1 - t0
        assert np.array_equal(got_ids, i)
        out.append(as_float32(got, packed.values_dtype))
        nbytes += packed.nbytes
    tokens = values.shape[0] * values.shape[1]
    return np.concatenate(out), nbytes / tokens, enc_s, dec_s


@torch.no_grad()
def main(sequences: int, seq_len: int, k: int) -> dict:
    torch.set_num_threads(2)
    teacher_dir = smollm2_folder()
    ids = pack_documents(load_documents("pydoc_topics"), load_tokenizer(teacher_dir), seq_len).tokens
    input_ids = torch.from_numpy(ids[:sequences].astype(np.int64))
    teacher = load_causal_lm(teacher_dir, dtype="float32").eval()
    start = time.perf_counter()
    top = torch.topk(torch.log_softmax(teacher(input_ids=input_ids).logits.float(), -1), k, dim=-1)
    teacher_tps = input_ids.numel() / (time.perf_counter() - start)
    values, top_ids = top.values.numpy(), top.indices.numpy().astype(np.uint16)
    del teacher
    students = {}
    for name, layers in STUDENTS.items():
        student = load_causal_lm(student_from_teacher(teacher_dir, layers), dtype="float32").eval()
        students[name] = student_view(student(input_ids=input_ids).logits.float(), top_ids)
        del student
    reference = {name: sparse_kl(values, *view) for name, view in students.items()}

    torch.set_num_threads(1)
    results = []
    for rows in sorted({1, 4, 16} & set(range(1, sequences + 1))):
        for codec, values_dtype in CODECS:
            decoded, bytes_per_token, enc_s, dec_s = round_trip(values, top_ids, codec, values_dtype, rows)
            row = {
                "codec": codec,
                "values_dtype": values_dtype,
                "tokens_per_block": rows * seq_len,
                "bytes_per_token": round(bytes_per_token, 2),
            }
            for name, view in students.items():
                change = np.abs(sparse_kl(decoded, *view) - reference[name])
                row[f"{name}: mean |dKL|"] = float(change.mean())
                row[f"{name}: max |dKL|"] = float(change.max())
            if codec != "none":
                tokens = values.shape[0] * values.shape[1]
                row["encode_tokens_per_s"] = round(tokens / enc_s)
                row["decode_tokens_per_s"] = round(tokens / dec_s)
            results.append(row)
    return {
        "benchmark": "stream_codecs",
        "teacher": "SmolLM2-135M-Instruct (fp32), top-k reference",
        "corpus": "pydoc_topics",
        "tokens": int(values.shape[0] * values.shape[1]),
        "k": k,
        "teacher_forward_tokens_per_s_2_threads": round(teacher_tps),
        "students_train_loss_kl_fp32": {name: float(r.mean()) for name, r in reference.items()},
        "results": results,
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "command": "python benchmarks/stream_codecs.py " + " ".join(sys.argv[1:]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(main(args.sequences, args.seq_len, args.k), indent=1))
