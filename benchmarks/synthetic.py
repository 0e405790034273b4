"""Hard-label distillation, before and after: the student that a `teacher=none data=completions` run started
from, and the student it exported, scored on the run's held-out completion tokens (held-out prompts) against
the teacher run live, in this process. Prints one JSON object.

    python benchmarks/synthetic.py RUN_DIR [TEACHER]      # TEACHER: a folder or builtin name (smollm2)

Per student: perplexity on the completion tokens, exact KL(teacher‖student) over the full vocabulary at the
positions that predict them, and top-1 agreement with the teacher there; plus the teacher's own perplexity.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill.data.completions import load_position_mask
from distill.eval import evaluate
from distill.models import SMOLLM2_NAME, load_causal_lm, resolve_model


def main(run_dir: Path, teacher_name: str = SMOLLM2_NAME) -> dict:
    start = time.perf_counter()
    torch.set_num_threads(2)
    heldout = np.load(run_dir / "data" / "heldout.npy", allow_pickle=False)
    positions = load_position_mask(run_dir / "data" / "heldout_mask.npy")
    teacher = load_causal_lm(resolve_model(teacher_name), dtype="float32", device=torch.device("cpu")).eval()

    def teacher_log_probs(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = teacher(input_ids=torch.from_numpy(batch.astype(np.int64))).logits
        return torch.log_softmax(logits.float(), dim=-1).numpy()

    initial = json.loads((run_dir / "models.json").read_text())["student"]
    result = {}
    for name, folder in (("before", initial), ("after", str(run_dir / "student"))):
        student = load_causal_lm(folder, dtype="float32", device=torch.device("cpu"))
        result[name] = evaluate(student, heldout, teacher_log_probs, micro_batch=4, mask=positions)
    result["heldout"] = {"sequences": len(heldout), "completion_tokens": int(positions.sum())}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["command"] = " ".join(["python", "benchmarks/synthetic.py", *sys.argv[1:]])
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python benchmarks/synthetic.py RUN_DIR [TEACHER]")
    main(Path(sys.argv[1]), *sys.argv[2:])
