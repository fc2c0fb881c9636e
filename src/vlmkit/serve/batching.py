"""The server's side of dynamic batching: admission control over the jobs it has submitted.

Batches themselves are formed beside the model (batch_queue.py, in the engine's thread or process),
so the model never waits for this event loop. Here: how many requests wait and how many decoded
image bytes they hold (429 beyond `max_queue` / `max_queued_bytes`), cancelling, and shutdown.
Results travel back per request through each `Job` (see jobs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from vlmkit.data.sample import Sample
from vlmkit.serve.conversation import GenerationParams
from vlmkit.serve.engine import Engine
from vlmkit.serve.errors import APIError
from vlmkit.serve.jobs import Job

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue is at `max_queue`; the request is refused with 429."""


class Batcher:
    """Owns the set of live jobs (submitted, not yet answered) on the event loop."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        wait_s: float,
        short_first: int = 2,
        max_queue: int,
        max_queued_bytes: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.max_queued_bytes = max_queued_bytes
        self._live: set[Job] = set()
        self._admitting = 0
        engine.configure(max_batch_size, wait_s, short_first)

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        """Around a request's admission: the engine's batch window waits for it (see batch_queue.py)."""
        self._admitting += 1
        self.engine.set_admitting(self._admitting)
        try:
            yield
        finally:
            self._admitting -= 1
            self.engine.set_admitting(self._admitting)

    @property
    def waiting(self) -> int:
        """Requests submitted whose batch has not started yet."""
        return sum(1 for job in self._live if not job.started)

    @property
    def queued_bytes(self) -> int:
        return sum(job.nbytes for job in self._live if not job.started)

    @property
    def in_flight(self) -> int:
        """Requests waiting or running."""
        return len(self._live)

    def stats(self) -> dict[str, object]:
        return self.engine.stats()

    def check_room(self, nbytes: int = 0) -> None:
        """Raise QueueFullError when a request of `nbytes` decoded image would not fit the queue."""
        waiting = self.waiting
        if waiting >= self.max_queue:
            raise QueueFullError(f"{waiting} requests are already waiting (max_queue={self.max_queue})")
        limit = self.max_queued_bytes
        if limit is not None and waiting and self.queued_bytes + nbytes > limit:
            raise QueueFullError(
                f"waiting requests already hold {self.queued_bytes} bytes of images "
                f"(max_queued_image_bytes={limit})"
            )

    def submit(
        self, request_id: str, sample: Sample, params: GenerationParams, *, stream: bool, nbytes: int = 0
    ) -> Job:
        """Hand a request to the engine (raises QueueFullError at `max_queue` or queued bytes)."""
        self.check_room(nbytes)
        loop = asyncio.get_running_loop()
        job = Job(
            id=request_id,
            sample=sample,
            params=params,
            stream=stream,
            loop=loop,
            future=loop.create_future(),
            nbytes=nbytes,
            on_finish=self._live.discard,
        )
        self._live.add(job)
        self.engine.submit(job)
        return job

    def cancel(self, job: Job) -> None:
        """Forget a request whose client gave up; if it is already running its row is ended."""
        if job.cancelled:
            return
        job.cancelled = True
        self._live.discard(job)
        self.engine.cancel(job)

    async def drain(self, grace_s: float) -> None:
        """Let waiting and running requests finish for up to `grace_s`, then end the rest with 503."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._live and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = list(self._live)
        if left:
            logger.warning("shutting down: %d request(s) did not finish within %.1f s", len(left), grace_s)
        self._end(left)

    async def aclose(self) -> None:
        self._end(list(self._live))
        self.engine.close()

    def _end(self, jobs: list[Job]) -> None:
        error = APIError(
            503, "the server is shutting down; retry later", type="server_error", code="shutting_down"
        )
        for job in jobs:
            job.deliver("error", error)
            self.cancel(job)
