"""Student engine: DeepSpeed ZeRO training, atomic checkpoints, export."""

import os

if "DS_ACCELERATOR" not in os.environ:
    # DeepSpeed probes for an accelerator at import and warns when it finds none; on a CPU-only
    # machine say so up front (gloo backend, CPU tensors) so the probe is quiet and deterministic.
    # Here, not in distill/__init__, so that data-only processes (tokeniser workers) never import torch.
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
