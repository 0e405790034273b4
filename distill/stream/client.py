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
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from distill.teacher.actor import TeacherOutput

log = logging.getLogger("distill")


class TeacherStreamError(RuntimeError):
    pass


@dataclass
class StreamStats:
    """Counters for logging: how long the student waited and how much crossed the wire."""

    wait_s: float = 0.0
    bytes: int = 0
    tokens: int = 0
    requests: int = 0

    def reset(self) -> None:
        self.wait_s, self.bytes, self.tokens, self.requests = 0.0, 0, 0, 0


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
    ):
        if prefetch < 1:
            raise ValueError(f"prefetch={prefetch} must be >= 1")
        self.replicas, self.topk, self.prefetch = list(replicas), topk, prefetch
        self.values_dtype, self.timeout_s = values_dtype, timeout_s
        self.hidden_layers = list(hidden_layers) if hidden_layers else None
        self.stats = StreamStats()
        self._ids = itertools.count()

    def _submit(self, input_ids: np.ndarray, request_id: int | None = None) -> tuple[int, Any, Any]:
        """Send one request (round-robin over live replicas); returns (request id, replica, ObjectRef)."""
        if request_id is None:
            request_id = next(self._ids)
        if not self.replicas:
            raise TeacherStreamError(
                "every teacher replica is dead (each exhausted its restarts); the run cannot continue"
            )
        replica = self.replicas[request_id % len(self.replicas)]
        ref = replica.submit_topk(request_id, input_ids, self.topk, self.values_dtype, self.hidden_layers)
        return request_id, replica, ref

    def _receive(self, request: tuple, input_ids: np.ndarray) -> TeacherOutput:
        """The reply to `request`; a replica that stays dead is dropped and the request sent elsewhere."""
        request_id, replica, ref = request
        start = time.perf_counter()
        while True:
            try:
                out: TeacherOutput = ray.get(ref, timeout=self.timeout_s)
                break
            except ray.exceptions.GetTimeoutError as e:
                raise TeacherStreamError(
                    f"teacher gave no answer to request {request_id} in {self.timeout_s:.0f} s "
                    f"(stream.timeout_s); is the teacher pool alive and large enough?"
                ) from e
            except ray.exceptions.RayActorError:  # raised only once Ray has given up restarting it
                if replica in self.replicas:
                    self.replicas.remove(replica)
                    log.warning("teacher replica died for good; %d replica(s) left", len(self.replicas))
                request_id, replica, ref = self._submit(input_ids, request_id)
        self.stats.wait_s += time.perf_counter() - start
        if out.request_id != request_id:
            raise TeacherStreamError(f"reply {out.request_id} arrived for request {request_id}")
        self.stats.bytes += out.nbytes
        self.stats.tokens += out.indices.shape[0] * out.indices.shape[1]
        self.stats.requests += 1
        return out

    def stream(self, batches: Iterable[Any], input_ids_of) -> Iterator[tuple[Any, TeacherOutput]]:
        """Yield (batch, teacher output) in order, keeping up to `prefetch` requests in flight."""
        pending: deque = deque()
        source = iter(batches)
        for batch in itertools.islice(source, self.prefetch):
            pending.append((batch, self._submit(input_ids_of(batch))))
        while pending:
            batch, request = pending.popleft()
            out = self._receive(request, input_ids_of(batch))
            nxt = next(source, None)
            if nxt is not None:
                pending.append((nxt, self._submit(input_ids_of(nxt))))
            yield batch, out

    def full_log_probs(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-vocabulary teacher log-probs (evaluation only)."""
        return ray.get(self.replicas[0].submit_full_log_probs(input_ids), timeout=self.timeout_s)
