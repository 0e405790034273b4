"""Teacher-cache storage: bytes per token of each value format, and the error each adds, measured on real
SmolLM2-135M-Instruct top-64 outputs over Python's documentation (pydoc). Prints one JSON object.

    python benchmarks/cache_storage.py                  # 16 sequences of 128 tokens, k=64
    python benchmarks/cache_storage.py --sequences 32 --k 32

For each `cache.values_dtype`: bytes/token of a real training shard (ids, top-k ids and values, plus the
per-row scale of int8; safetensors header included), the mean / max absolute error of the stored
log-probs against fp32, the KL between the fp32 and the stored top-k + tail-bucket teacher distributions
(and the share of rows whose tail rounding removed), and how much the training loss (forward KL, tail
bucket) of the pruned student moves against fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from distill.cache.codec import VALUE_FORMATS, decode_float32
from distill.cache.writer import shard_tensors
from distill.data import load_documents, pack_documents
from distill.losses import DistillationLoss
from distill.models import load_causal_lm, load_tokenizer, smollm2_folder, student_from_teacher
from distill.teacher.actor import index_dtype


def bucket_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[float, float]:
    """KL(fp32 ‖ stored) over the k ids plus the tail bucket (float64), averaged over the rows whose stored
    tail is positive, and the share of rows where rounding pushed the stored top-k mass to >= 1 (the loss
    then gives the teacher's tail zero mass, as it does for any format)."""
    p, q = log_p.double().exp(), log_q.double().exp()
    p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
    kept = q_tail > 0
    tail = p_tail.clamp_min(1e-300) * (p_tail.clamp_min(1e-300).log() - q_tail.clamp_min(1e-300).log())
    kl = (p * (log_p.double() - log_q.double())).sum(-1) + tail
    return kl[kept].mean().item(), 1 - kept.double().mean().item()


@torch.no_grad()
def main(sequences: int, seq_len: int, k: int) -> dict:
    torch.set_num_threads(2)
    teacher_dir = smollm2_folder()
    tokenizer = load_tokenizer(teacher_dir)
    ids = pack_documents(load_documents("pydoc_topics"), tokenizer, seq_len).tokens[:sequences]
    input_ids = torch.from_numpy(ids.astype(np.int64))
    teacher = load_causal_lm(teacher_dir, dtype="float32").eval()
    values, indices = torch.topk(
        torch.log_softmax(teacher(input_ids=input_ids).logits.float(), -1), k, dim=-1
    )
    indices_np = indices.numpy().astype(index_dtype(teacher.config.vocab_size))
    del teacher
    student = load_causal_lm(student_from_teacher(teacher_dir, [0, 29]), dtype="float32").eval()
    student_logits = student(input_ids=input_ids).logits.float()
    loss = DistillationLoss("forward_kl", tail="bucket")
    tokens = ids.size

    def train_loss(v: torch.Tensor) -> float:
        return loss(student_logits, v, indices, None, None, float(tokens)).loss.item()

    reference = train_loss(values)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in VALUE_FORMATS:
            tensors = shard_tensors(ids, values.numpy(), indices_np, fmt)
            path = Path(tmp) / f"{fmt}.safetensors"
            save_file(tensors, str(path))
            stored = decode_float32(tensors, fmt)
            error = (stored - values).abs()
            kl, lost = bucket_kl(values, stored)
            results[fmt] = {
                "bytes_per_token": path.stat().st_size / tokens,
                "mean_abs_logprob_error": error.mean().item(),
                "max_abs_logprob_error": error.max().item(),
                "teacher_topk_bucket_kl_vs_fp32": kl,
                "rows_tail_lost": lost,
                "train_loss_abs_change_vs_fp32": abs(train_loss(stored) - reference),
            }
    return {
        "benchmark": "cache_storage",
        "teacher": "SmolLM2-135M-Instruct (fp32)",
        "student": "SmolLM2 pruned to layers [0, 29] (train loss: forward KL, tail bucket)",
        "corpus": "pydoc_topics",
        "tokens": tokens,
        "k": k,
        "train_loss_fp32": reference,
        "formats": results,
        "note": "held-out shards add 4 bytes/token (fp32 log-prob of each actual next token)",
        "command": "python benchmarks/cache_storage.py " + " ".join(sys.argv[1:]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(main(args.sequences, args.seq_len, args.k), indent=1))
