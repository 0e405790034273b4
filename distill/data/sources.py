"""Several named data sources in one run: each tokenised on its own, every window tagged with its source.

No window straddles two sources, so each token's teacher is well defined (`routing`). Each source keeps
`data.heldout_sequences` held-out windows (a per-domain evaluation set), even when it is not trained on;
`heldout_source.npy` holds each held-out window's index into `data.sources`. Training windows carry their
source through `TrainWindows.source_of`; `weight` mixes sources per global batch (distill/data/sampler.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def domains(data_dir: Path, names: list[str], rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's share of every source's held-out sequences, by source name."""
    heldout = np.load(data_dir / "heldout.npy", allow_pickle=False)
    source = np.load(data_dir / "heldout_source.npy", allow_pickle=False)
    return {name: heldout[source == i][rank::world] for i, name in enumerate(names)}
