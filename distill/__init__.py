"""distill: knowledge distillation of LLMs with Ray teacher services and DeepSpeed ZeRO students."""

import os

if "DS_ACCELERATOR" not in os.environ:
    # DeepSpeed probes for an accelerator at import and warns when it finds none; on a CPU-only
    # machine say so up front (gloo backend, CPU tensors) so the probe is quiet and deterministic.
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
