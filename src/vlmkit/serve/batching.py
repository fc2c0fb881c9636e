"""Dynamic batching: requests wait briefly in a queue and run together in one `generate` call.

One collector task on the event loop forms batches; one worker thread runs the model, so the
model never runs concurrently with itself. A batch only holds requests whose decoding settings
match (`GenerationParams.batch_key`), and the oldest waiting request picks the next batch's
settings (no starvation). Results travel back per request through each `Job` (see jobs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vlmkit.data.sample import Sample
from vlmkit.models.adapters.base import ModelAdapter
from vlmkit.serve.conversation import GenerationParams
from vlmkit.serve.errors import APIError
from vlmkit.serve.jobs import Job
from vlmkit.serve.worker import run_batch

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue is at `max_queue`; the request is refused with 429."""


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


class Batcher:
    """Owns the waiting queue, the collector task and the single model thread."""

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        max_batch_size: int,
        wait_s: float,
        max_queue: int,
        max_queued_bytes: int | None = None,
    ) -> None:
        self.adapter = adapter
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.max_queued_bytes = max_queued_bytes
        self.stats = BatchStats()
        self.queued_bytes = 0
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmkit-model")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Requests waiting or running."""
        return len(self._pending) + sum(1 for job in self._running if not job.cancelled)

    def check_room(self, nbytes: int = 0) -> None:
        """Raise QueueFullError when a request of `nbytes` decoded image would not fit the queue."""
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(
                f"{len(self._pending)} requests are already waiting (max_queue={self.max_queue})"
            )
        limit = self.max_queued_bytes
        if limit is not None and self._pending and self.queued_bytes + nbytes > limit:
            raise QueueFullError(
                f"waiting requests already hold {self.queued_bytes} bytes of images "
                f"(max_queued_image_bytes={limit})"
            )

    def submit(
        self, request_id: str, sample: Sample, params: GenerationParams, *, stream: bool, nbytes: int = 0
    ) -> Job:
        """Queue a request (raises QueueFullError at `max_queue` waiting requests or queued bytes)."""
        loop = self._ensure_started()
        self.check_room(nbytes)
        job = Job(
            id=request_id,
            sample=sample,
            params=params,
            stream=stream,
            loop=loop,
            future=loop.create_future(),
            nbytes=nbytes,
        )
        self._pending.append(job)
        self.queued_bytes += nbytes
        assert self._wakeup is not None
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> None:
        """Forget a request whose client gave up; if it is already running its result is dropped."""
        job.cancelled = True
        with contextlib.suppress(ValueError):
            self._pending.remove(job)
            self.queued_bytes -= job.nbytes

    async def drain(self, grace_s: float) -> None:
        """Let waiting and running requests finish for up to `grace_s`, then end the rest with 503."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        error = APIError(
            503, "the server is shutting down; retry later", type="server_error", code="shutting_down"
        )
        left = [*self._pending, *(job for job in self._running if not job.cancelled)]
        if left:
            logger.warning("shutting down: %d request(s) did not finish within %.1f s", len(left), grace_s)
        for job in left:
            job.deliver("error", error)
            self.cancel(job)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        error = APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        while self._pending:
            self._pending.popleft().deliver("error", error)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- collector ---------------------------------------------------------------------------------
    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._pending.clear()
            self.queued_bytes = 0
            self._task = loop.create_task(self._collect(), name="vlmkit-batcher")
        return loop

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        wakeup = self._wakeup
        while True:
            if not self._pending:
                wakeup.clear()
                await wakeup.wait()
                continue
            key = self._pending[0].key
            deadline = loop.time() + self.wait_s
            while self._count(key) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(key)
            if not batch:
                continue
            self.stats.record(len(batch))
            self._running = batch
            try:
                await loop.run_in_executor(self._executor, run_batch, self.adapter, batch)
            except Exception:  # run_batch handles its own errors; this is a last resort
                logger.exception("batch of %d failed", len(batch))
                error = APIError(500, "internal error; see the server log", type="server_error")
                for job in batch:
                    job.deliver("error", error)
            finally:
                self._running = []

    def _count(self, key: tuple[object, ...]) -> int:
        return sum(1 for job in self._pending if job.key == key)

    def _take(self, key: tuple[object, ...]) -> list[Job]:
        batch = [job for job in self._pending if job.key == key][: self.max_batch_size]
        for job in batch:
            self._pending.remove(job)
            self.queued_bytes -= job.nbytes
        return [job for job in batch if not job.cancelled]
