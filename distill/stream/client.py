"""The student side of the teacher stream.

A rank knows which micro-batches it will train on next (the sampler is a pure function of the
step), so it asks the teacher for up to `prefetch` of them before it needs them: teacher compute
overlaps student compute, and at most `prefetch` requests per rank are ever in flight.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from distill.teacher.actor import TeacherOutput

log = logging.getLogger("distill")


class TeacherStreamError(RuntimeError):
    """The stream cannot go on: every replica is gone, or a live one stopped answering (stream.max_wait_s)."""


class TeacherRaisedError(TeacherStreamError):
    """The teacher itself raised an error on a request (out of memory, the fp16 overflow check, ...): not a
    dead replica, and not fixed by waiting or by another replica, so the run stops with its message."""


def teacher_error(error: Exception, what: str) -> TeacherRaisedError:
    """A TeacherRaisedError carrying the teacher's own exception (a Ray task error's cause) and `what`."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines() or [""]
    return TeacherRaisedError(f"the teacher raised {type(cause).__name__} on {what}: {lines[-1][:500]}")


@dataclass
class StreamStats:
    """Counters for logging: how long the student waited, how much crossed the wire, how many requests
    were outstanding, and what each replica served (tokens and its own compute seconds)."""

    replicas: int = 0
    wait_s: float = 0.0
    bytes: int = 0
    tokens: int = 0
    requests: int = 0
    in_flight_sum: int = 0  # Σ over replies of this rank's outstanding requests when it arrived
    hop_bytes: int = 0  # activations sent between pipeline stages for this rank's replies
    replica_tokens: list[int] = field(default_factory=list)
    replica_compute_s: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.replica_tokens = self.replica_tokens or [0] * self.replicas
        self.replica_compute_s = self.replica_compute_s or [0.0] * self.replicas

    def copy(self) -> StreamStats:
        return replace(
            self, replica_tokens=list(self.replica_tokens), replica_compute_s=list(self.replica_compute_s)
        )

    def since(self, earlier: StreamStats) -> StreamStats:
        """The counts accumulated after `earlier` (a `copy()` taken at the start of a step)."""
        return StreamStats(
            self.replicas,
            self.wait_s - earlier.wait_s,
            self.bytes - earlier.bytes,
            self.tokens - earlier.tokens,
            self.requests - earlier.requests,
            self.in_flight_sum - earlier.in_flight_sum,
            self.hop_bytes - earlier.hop_bytes,
            [a - b for a, b in zip(self.replica_tokens, earlier.replica_tokens)],
            [a - b for a, b in zip(self.replica_compute_s, earlier.replica_compute_s)],
        )

    def as_vector(self) -> list[float]:
        """The counts `metrics` needs, as one flat list that ranks can all-reduce (sum) together."""
        return [self.wait_s, self.requests, self.in_flight_sum, *self.replica_tokens, *self.replica_compute_s]

    @staticmethod
    def metrics(summed: list[float], wall_s: float, ranks: int) -> dict[str, float]:
        """Log metrics from `as_vector()` summed over `ranks` ranks during `wall_s` seconds.

        - stream/wait_fraction: share of the students' time spent waiting for the teacher
        - teacher/queue_depth: requests outstanding at the pool (queued or running), all ranks together
        - teacher/replica<i>/tokens_per_s: tokens replica i delivered per second of wall time
        - teacher/replica<i>/busy_fraction: its compute seconds per wall second (a pipeline replica sums
          its stages, so up to `stages` when every stage is busy)
        """
        wait_s, requests, in_flight_sum, *per_replica = summed
        n = len(per_replica) // 2
        out = {
            "stream/wait_fraction": wait_s / max(wall_s * ranks, 1e-9),
            "teacher/queue_depth": in_flight_sum / max(requests, 1) * ranks,
        }
        for i, (tokens, compute_s) in enumerate(zip(per_replica[:n], per_replica[n:])):
            out[f"teacher/replica{i}/tokens_per_s"] = tokens / max(wall_s, 1e-9)
            out[f"teacher/replica{i}/busy_fraction"] = compute_s / max(wall_s, 1e-9)
        return out


class TeacherStream:
    """Requests top-k log-probs (and, with `hidden_layers`, those teacher layers' hidden states)."""

    def __init__(
        self,
        replicas: list,
        topk: int,
        prefetch: int,
        values_dtype: str,
        timeout_s: float,
        hidden_layers: list[int] | None = None,
        first_replica: int = 0,
        max_wait_s: float | None = None,
        codec: str = "none",
        sparsifier=None,
    ):
        """`timeout_s`: how long a reply may take before the stream says it is slow (and again after
        twice as long, and so on); `max_wait_s` (default `timeout_s`): how long it waits in all for one reply
        from a replica Ray still has alive before it gives up (TeacherStreamError). A replica Ray reports
        dead is dropped at once and its requests go to the others. `codec` (distill/codecs.py): how the
        teachers encode top-k replies; they are decoded here, and the stream's bytes count them encoded.
        `sparsifier` (distill/teacher/sparsify.py `Sparsifier`, None = top-k): which entries a reply holds."""
        if prefetch < 1:
            raise ValueError(f"prefetch={prefetch} must be >= 1")
        self.replicas, self.topk, self.prefetch = list(replicas), topk, prefetch
        self.values_dtype, self.timeout_s, self.codec = values_dtype, timeout_s, codec
        self.sparsifier = sparsifier
        self.max_wait_s = max(timeout_s, max_wait_s or timeout_s)
        self.hidden_layers = list(hidden_layers) if hidden_layers else None
        # ranks start the round-robin at different replicas (their rank), so they spread over the pool
        self.first_replica = first_replica
        self.stats = StreamStats(replicas=len(self.replicas))
        self._replica_index = {id(r): i for i, r in enumerate(self.replicas)}  # stable once some die
        self._ids = itertools.count()
        self._eval_ids = itertools.count()
        self.eval_bytes = 0  # full-vocabulary log-probs received for evaluation (its cost, logged per eval)

    def _submit(self, input_ids: np.ndarray, request_id: int | None = None) -> tuple[int, Any, Any]:
        """Send one request (round-robin over live replicas); returns (request id, replica, ObjectRef)."""
        if request_id is None:
            request_id = next(self._ids)
        if not self.replicas:
            raise TeacherStreamError(
                "every teacher replica is dead (each exhausted its restarts); the run cannot continue"
            )
        replica = self.replicas[(request_id + self.first_replica) % len(self.replicas)]
        ref = replica.submit_topk(
            request_id,
            input_ids,
            self.topk,
            self.values_dtype,
            self.hidden_layers,
            codec=self.codec,
            sparsifier=self.sparsifier,
        )
        return request_id, replica, ref

    def _receive(self, request: tuple, input_ids: np.ndarray, in_flight: int) -> TeacherOutput:
        """The reply to `request`; a replica that stays dead is dropped and the request sent elsewhere."""
        import ray  # here, not at module level: routing and cached runs import this module without Ray

        request_id, replica, ref = request
        start = time.perf_counter()
        while True:
            try:
                out: TeacherOutput = self._wait(ref, f"request {request_id}", replica)
                break
            except ray.exceptions.RayActorError:  # raised only once Ray has given up restarting it
                if replica in self.replicas:
                    self.replicas.remove(replica)
                    log.warning("teacher replica died for good; %d replica(s) left", len(self.replicas))
                request_id, replica, ref = self._submit(input_ids, request_id)
        out = out.unpacked()  # decoding counts as waiting: the student cannot go on without it
        self.stats.wait_s += time.perf_counter() - start
        if out.request_id != request_id:
            raise TeacherStreamError(f"reply {out.request_id} arrived for request {request_id}")
        tokens = out.indices.shape[0] * out.indices.shape[1]
        self.stats.bytes += out.nbytes
        self.stats.hop_bytes += out.hop_bytes
        self.stats.tokens += tokens
        self.stats.requests += 1
        self.stats.in_flight_sum += in_flight
        self.stats.replica_tokens[self._replica_index[id(replica)]] += tokens
        self.stats.replica_compute_s[self._replica_index[id(replica)]] += out.compute_s
        return out

    def _wait(self, ref, what: str, replica) -> Any:
        """`ray.get(ref)`, told apart: a slow reply is waited for (a log line after `timeout_s`, then after
        twice as long each time) up to `max_wait_s` in all; an exception the teacher raised becomes
        TeacherRaisedError; a dead replica's RayActorError is left to the caller."""
        import ray

        waited, timeout = 0.0, self.timeout_s
        while True:
            try:
                return ray.get(ref, timeout=min(timeout, self.max_wait_s - waited))
            except ray.exceptions.GetTimeoutError as e:
                waited += min(timeout, self.max_wait_s - waited)
                if waited >= self.max_wait_s:
                    raise TeacherStreamError(
                        f"teacher replica {self._replica_index.get(id(replica), '?')} is alive but gave no "
                        f"answer to {what} in {waited:.0f} s (stream.max_wait_s); is it stuck or far too "
                        f"slow for its load (more replicas, a smaller micro-batch)?"
                    ) from e
                timeout *= 2
                log.warning(
                    "teacher replica %s has not answered %s after %.0f s; it is alive (Ray has not reported "
                    "it dead), so waiting up to %.0f s more (stream.max_wait_s=%.0f)",
                    self._replica_index.get(id(replica), "?"),
                    what,
                    waited,
                    self.max_wait_s - waited,
                    self.max_wait_s,
                )
            except ray.exceptions.RayActorError:
                raise
            except ray.exceptions.RayTaskError as e:  # the teacher's own exception, raised inside its task
                raise teacher_error(e, what) from e

    def stream(self, batches: Iterable[Any], input_ids_of) -> Iterator[tuple[Any, TeacherOutput]]:
        """Yield (batch, teacher output) in order, keeping up to `prefetch` requests in flight."""
        pending: deque = deque()
        source = iter(batches)
        for batch in itertools.islice(source, self.prefetch):
            pending.append((batch, self._submit(input_ids_of(batch))))
        while pending:
            in_flight = len(pending)
            batch, request = pending.popleft()
            out = self._receive(request, input_ids_of(batch), in_flight)
            nxt = next(source, None)
            if nxt is not None:
                pending.append((nxt, self._submit(input_ids_of(nxt))))
            yield batch, out

    def full_log_probs(self, input_ids: np.ndarray, start: int = 0) -> np.ndarray:
        """Full-vocabulary teacher log-probs [B, T - start, V] of positions `start`.. of `input_ids` [B, T],
        as float32 (evaluation only; a 16-bit teacher sends float16, half the bytes, counted in
        `eval_bytes`). Requests go round-robin over the live replicas (from this rank's own first one), so
        the ranks' evaluations spread over the pool."""
        import ray

        request = next(self._eval_ids)
        while self.replicas:
            replica = self.replicas[(request + self.first_replica) % len(self.replicas)]
            try:
                answer = self._wait(
                    replica.submit_full_log_probs(input_ids, start), "an evaluation request", replica
                )
                self.eval_bytes += answer.nbytes
                return np.asarray(answer, dtype=np.float32)
            except ray.exceptions.RayActorError:
                self.replicas.remove(replica)
                log.warning("teacher replica died for good; %d replica(s) left", len(self.replicas))
        raise TeacherStreamError(
            "every teacher replica is dead (each exhausted its restarts); the run cannot continue"
        )
