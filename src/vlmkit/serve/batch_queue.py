"""The batching policy, beside the model: jobs wait here and the model's own thread takes batches.

It lives with the model (its thread, or the model process) rather than on the server's event
loop, so forming the next batch never waits for HTTP work: under a flood of bad requests the
event loop is busy, and a collector there left the model idle between batches.

Policy: a batch only holds jobs whose decoding settings match (`GenerationParams.batch_key`). The
shortest waiting job (fewest `max_tokens`) picks the next batch's settings, but a job passed over
`short_first` times (default 2 batches) goes next whatever its length, so nothing starves: a
request for 16 tokens does not wait behind 200-token ones, and a long request whose client
leaves while it waits (as abandoned clients do) often never costs a step. When the model is
idle and a job arrives, it waits up to `wait_s` for the batch to fill to `max_batch_size` (up to
4x longer while the server says requests are still being admitted); while the model is busy, jobs
accumulate and the next batch takes them at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vlmkit.serve.errors import APIError

if TYPE_CHECKING:
    from vlmkit.serve.conversation import GenerationParams

logger = logging.getLogger(__name__)


class QueuedJob(Protocol):
    cancelled: bool
    params: GenerationParams

    @property
    def key(self) -> tuple[object, ...]: ...


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    sizes: Counter[int] = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.sizes[size] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "largest_batch": max(self.sizes, default=0),
            "mean_batch": round(self.requests / self.batches, 2) if self.batches else 0.0,
        }


class BatchQueue:
    """Thread-safe: any thread may `put` / `discard`; one model thread calls `take`."""

    def __init__(self, max_batch_size: int = 16, wait_s: float = 0.005, short_first: int = 2) -> None:
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.short_first = short_first
        self._passed: dict[int, int] = {}  # id(job) -> batches that ran ahead of it
        self._jobs: deque[Any] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._admitting = 0

    def configure(self, max_batch_size: int, wait_s: float, short_first: int = 2) -> None:
        with self._ready:
            self.max_batch_size, self.wait_s, self.short_first = max_batch_size, wait_s, short_first

    def set_admitting(self, count: int) -> None:
        """Requests the server is still admitting (decoding images, counting): worth waiting for."""
        with self._ready:
            self._admitting = count
            self._ready.notify()

    def put(self, job: QueuedJob) -> None:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def discard(self, job: QueuedJob) -> None:
        with self._ready:
            if job in self._jobs:
                self._jobs.remove(job)
                self._passed.pop(id(job), None)
                self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take(self) -> list[Any] | None:
        """The next batch (blocking until there is one), or None once closed."""
        with self._ready:
            while True:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return None
                key = self._pick()
                started = time.monotonic()
                while self._count(key) < self.max_batch_size and not self._closed:
                    # wait_s for the batch to fill, up to 4x that while requests are still admitted
                    # (their images decoding): a wall-clock window alone closed on half batches
                    window = self.wait_s * (4 if self._admitting else 1)
                    remaining = started + window - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.wait(remaining)
                if not self._jobs:  # every waiting job was cancelled meanwhile
                    continue
                key = self._pick()  # a shorter request may have arrived meanwhile
                batch = [job for job in self._jobs if job.key == key][: self.max_batch_size]
                first = self._jobs.index(batch[0])
                for job in list(self._jobs)[:first]:  # older jobs this batch runs ahead of
                    self._passed[id(job)] = self._passed.get(id(job), 0) + 1
                for job in batch:
                    self._jobs.remove(job)
                    self._passed.pop(id(job), None)
                batch = [job for job in batch if not job.cancelled]
                if batch:
                    return batch

    def _pick(self) -> tuple[object, ...]:
        """The next batch's settings: the shortest waiting request's (fewest max_tokens, oldest
        first among equals), unless the oldest request was already passed `short_first` times."""
        oldest = self._jobs[0]
        if self._passed.get(id(oldest), 0) >= self.short_first:
            return oldest.key
        return min(self._jobs, key=lambda job: job.params.max_new_tokens).key

    def _count(self, key: tuple[object, ...]) -> int:
        return sum(1 for job in self._jobs if job.key == key)


def serve_batches(
    queue: BatchQueue, run: Callable[[list[Any]], None], stats: BatchStats | None = None
) -> None:
    """The model thread's loop: take a batch, run it, until the queue is closed.

    `run` (run_batch) answers its own errors; one that escapes still fails only its batch (500),
    so the model thread lives on and later requests do not wait for a thread that is gone.
    """
    while (batch := queue.take()) is not None:
        if stats is not None:
            stats.record(len(batch))
        try:
            run(batch)
        except Exception:
            logger.exception("batch of %d failed", len(batch))
            error = APIError(500, "internal error; see the server log", type="server_error")
            for job in batch:
                job.notify_from_worker("error", error)
