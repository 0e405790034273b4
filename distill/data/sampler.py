"""Which sequences each rank trains on at each step: a pure function of (seed, step).

Because the position is just the global step, the sampler's state checkpoints as one integer and a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np


class StepSampler:
    def __init__(
        self, num_sequences: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int
    ):
        self.global_batch = micro_batch * grad_accum * world_size
        if num_sequences < self.global_batch:
            raise ValueError(
                f"{num_sequences} training sequences are fewer than one global batch "
                f"(micro_batch_size {micro_batch} x grad_accum_steps {grad_accum} x ranks {world_size} = "
                f"{self.global_batch}); add data or shrink the batch."
            )
        self.num_sequences, self.micro_batch, self.grad_accum = num_sequences, micro_batch, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.steps_per_epoch = num_sequences // self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """Sequence indices of this rank's `grad_accum` micro-batches for optimizer step `step` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_batch
        chunk = self._permutation(epoch)[start : start + self.global_batch]
        # rank r takes micro-batch slots r, r + world, ... so every split of one global batch is the same set
        slots = chunk.reshape(self.grad_accum * self.world_size, self.micro_batch)
        return [slots[i * self.world_size + self.rank] for i in range(self.grad_accum)]
