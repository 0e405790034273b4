"""Which windows each rank trains on at each step: a pure function of (seed, step), O(global batch) a step.

Each source is read as an endless stream of epochs; epoch e of a source with N windows visits them in the
order of a pseudo-random permutation of [0, N) keyed by (seed, source, e), evaluated one position at a
time (a Feistel network with cycle walking), so no step ever builds or stores an O(dataset) array.

Several sources are mixed by weight like Megatron's blends, with a closed form instead of a precomputed
index: with a = (w_1 + ... + w_k) * B for a global batch of B windows, source k's cumulative count after s
steps is C_k(s) = floor(a_k s) - floor(a_{k-1} s). It is within one window of w_k * B * s at every step
(realised proportions are exact to 1 / (B s)), its increments sum to B, and it never decreases while
w_k * B >= 1. Step s takes positions [C_k(s), C_k(s+1)) of source k's stream. The step's B windows are
then shuffled (a permutation of [0, B) keyed by (seed, step); with one source its stream is shuffled
already and slot j is simply stream position B s + j) and dealt to ranks: rank r takes micro-batch slots
r, r + ranks, ..., so every split of one global batch over ranks and accumulation trains the same set; a
rank computes only its own B / ranks indices.
Because the position is just the step, the sampler's state checkpoints as one integer.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_M64 = (1 << 64) - 1


_GOLDEN = 0x9E3779B97F4A7C15
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit integer hash (splitmix64 finaliser) of the uint64 array x under `key`, elementwise
    (array arithmetic wraps modulo 2^64 silently, as the hash wants). In place on one new array: a rank
    hashes a few dozen values a step, so numpy's per-call overhead, not arithmetic, is the cost."""
    z = x + np.uint64((key * _GOLDEN) & _M64)
    z ^= z >> _S30
    z *= _C1
    z ^= z >> _S27
    z *= _C2
    z ^= z >> _S31
    return z


def _key(*parts: int) -> int:
    """One 64-bit key from several integers (seed, source, epoch, round), in plain Python integers."""
    k = 0
    for p in parts:
        z = (k ^ (p & _M64)) + _GOLDEN & _M64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        k = z ^ (z >> 31)
    return k


@functools.lru_cache(maxsize=256)
def _round_keys(key: int, rounds: int) -> tuple[int, ...]:
    """Each Feistel round's key under `key`. Cached: an epoch's permutation is evaluated every step with
    the same keys (and deriving them costs as much as permuting a few positions)."""
    return tuple(_key(key, r) for r in range(rounds))


def permute(positions, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """The image of `positions` (each in [0, n)) under a keyed pseudo-random permutation of [0, n).

    A balanced Feistel network (4 rounds: Luby-Rackoff's pseudo-random permutation) over the smallest even
    number of bits covering n is a permutation of [0, 2^bits); applying it again while a value falls
    outside [0, n) (cycle walking) restricts it to a permutation of [0, n). 2^bits < 4n, so a value needs
    fewer than 4 applications on average.

    Each round hashes with the full splitmix64 finaliser. Cheaper permutations were measured (three such
    rounds; three or four of a multiply-add-shift or a multiply-xorshift): each left the offset
    p(x + d) - p(x) detectably non-uniform over x for some small d (chi-square over 2.4M windows), so the
    loader's cost was cut elsewhere (benchmarks/data.py loader)."""
    if n <= 1:
        return np.asarray(positions, dtype=np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # exact: a float log2 rounds near large powers of two
    keys = _round_keys(key, rounds)
    if len(positions) <= SMALL:
        values = positions.tolist() if isinstance(positions, np.ndarray) else list(positions)
        return np.asarray(_permute_small(values, n, half, keys), dtype=np.int64)
    x = np.asarray(positions, dtype=np.uint64)
    lo_mask, shift = np.uint64((1 << half) - 1), np.uint64(half)

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & lo_mask
        for k in keys:
            mixed = _mix(right, k)
            mixed &= lo_mask
            mixed ^= left
            left, right = right, mixed
        left <<= shift
        left |= right
        return left

    out = feistel(x)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


SMALL = 48  # up to this many positions, plain Python integers beat numpy's per-call overhead


def _permute_small(positions: list[int], n: int, half: int, keys: tuple[int, ...]) -> list[int]:
    """`permute` in plain Python integers, value for value the same: a rank permutes a few dozen
    positions a step, where numpy's fixed cost per operation (a microsecond) dominates."""
    lo_mask = (1 << half) - 1
    adds = [(k * _GOLDEN) & _M64 for k in keys]
    out = []
    for v in positions:
        while True:  # cycle walking
            left, right = v >> half, v & lo_mask
            for add in adds:
                z = right + add & _M64
                z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9 & _M64
                z = (z ^ z >> 27) * 0x94D049BB133111EB & _M64
                left, right = right, left ^ (z ^ z >> 31) & lo_mask
            v = left << half | right
            if v < n:
                break
        out.append(v)
    return out


class StepSampler:
    """Global window indices per (step, rank): `micro_batches(step)` gives this rank's `grad_accum`
    micro-batches. `sizes`: windows per source (their global indices are laid end to end); `weights`:
    mixing weights (None: proportional to size, i.e. uniform over all windows)."""

    def __init__(
        self,
        sizes: int | list[int],
        micro_batch: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        weights: list[float] | None = None,
    ):
        self.sizes = [sizes] if isinstance(sizes, int) else list(sizes)
        self.global_batch = micro_batch * grad_accum * world_size
        total = sum(self.sizes)
        if total < self.global_batch:
            raise ValueError(
                f"{total} training sequences are fewer than one global batch "
                f"(micro_batch_size {micro_batch} x grad_accum_steps {grad_accum} x ranks {world_size} = "
                f"{self.global_batch}); add data or shrink the batch."
            )
        weights = list(weights) if weights is not None else [s / total for s in self.sizes]
        if len(weights) != len(self.sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data source weights {weights} must be one non-negative number per source.")
        self.weights = [w / sum(weights) for w in weights]
        for size, w in zip(self.sizes, self.weights):
            if w > 0 and size == 0:
                raise ValueError("a data source with weight > 0 has no training windows.")
            if 0 < w * self.global_batch < 1:
                raise ValueError(
                    f"a data source weight of {w:.3g} gives it under one window per global batch of "
                    f"{self.global_batch}; raise its weight to >= {1 / self.global_batch:.3g} or the batch."
                )
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        # cumulative a_k = (w_1 + ... + w_k) * B; the last is exactly B so the counts always sum to B
        cum = np.cumsum(self.weights) * self.global_batch
        cum[-1] = self.global_batch
        self._cum = [0.0, *cum.tolist()]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def source_counts(self, step: int) -> np.ndarray:
        """C_k(step): windows each source has given in steps [0, step)."""
        last = len(self._cum) - 1
        d = [self.global_batch * step if i == last else math.floor(a * step) for i, a in enumerate(self._cum)]
        return np.diff(np.asarray(d, dtype=np.int64))

    def global_batch_indices(self, step: int, slots: np.ndarray | None = None) -> np.ndarray:
        """Global window indices at micro-batch positions `slots` of step `step` (all B when None), in O(len
        (slots)): position j of the step is dealt, by a permutation of [0, B) keyed by (seed, step), the j'-th
        window of the step's by-source list, i.e. one of source k's stream positions [C_k(s), C_k(s+1)). With
        one source, position j is stream position B s + j: the epoch's permutation has shuffled the stream
        already, and a second permutation would double a rank's cost for nothing."""
        slots = np.arange(self.global_batch) if slots is None else np.asarray(slots, dtype=np.int64)
        if len(self.sizes) == 1:  # one source: C(s) = B s
            return self._stream_windows(0, step * self.global_batch + slots)
        dealt = permute(slots, self.global_batch, _key(self.seed, step, 0x5EED))
        start, end = self.source_counts(step), self.source_counts(step + 1)
        before = np.concatenate([[0], np.cumsum(end - start)])
        source = np.searchsorted(before, dealt, side="right") - 1
        out = np.empty(len(slots), dtype=np.int64)
        for k in np.unique(source):
            sel = source == k
            out[sel] = self._stream_windows(int(k), start[k] + dealt[sel] - before[k])
        return out

    def _stream_windows(self, k: int, position: np.ndarray) -> np.ndarray:
        """Global indices of positions `position` of source k's endless stream: epoch e is a permutation of
        the source's windows keyed by (seed, k, e)."""
        n = self.sizes[k]
        epoch, within = position // n, position % n
        if epoch.min() == epoch.max():  # the usual case: the step lies inside one epoch
            return permute(within, n, _key(self.seed, k, int(epoch[0]))) + self.offsets[k]
        local = np.empty_like(position)
        for e in np.unique(epoch):
            in_epoch = epoch == e
            local[in_epoch] = permute(within[in_epoch], n, _key(self.seed, k, int(e)))
        return local + self.offsets[k]

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """Global indices of this rank's `grad_accum` micro-batches for optimizer step `step` (0-based)."""
        mine = [i * self.world_size + self.rank for i in range(self.grad_accum)]  # micro-batch slots
        positions = (np.asarray(mine)[:, None] * self.micro_batch + np.arange(self.micro_batch)).ravel()
        return list(self.global_batch_indices(step, positions).reshape(self.grad_accum, self.micro_batch))
