"""Where the model runs for the server: a thread of this process, or a process of its own.

The server submits admitted jobs; the engine batches them beside the model (batch_queue.py) and
answers each through the job's events; admission asks it for prompt lengths.
`ThreadEngine` keeps the model in the server's process (tests, library use with an adapter
object). `ProcessEngine` (engine_process.py, what `vlmkit serve` uses) puts it in a child process,
because in one process every request the HTTP side parses, refuses or decodes holds the same GIL
the model needs between its kernels: a flood of cheap bad requests cut normal throughput 5-30x.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

from vlmkit.data.sample import Message
from vlmkit.models.adapters.base import ModelAdapter
from vlmkit.serve.batch_queue import BatchQueue, BatchStats, serve_batches
from vlmkit.serve.errors import APIError
from vlmkit.serve.jobs import Job
from vlmkit.serve.prompt_length import PromptCounter, PromptLimits
from vlmkit.serve.worker import run_batch

DEFAULT_LOADER = "vlmkit.models.adapters:load_adapter"


def load_served_adapter(
    model_dir: str, device: str | None = None, loader: str = DEFAULT_LOADER
) -> ModelAdapter:
    """The adapter a server runs, in eval mode, on CUDA when there is one: what both engines load.

    `loader` ("module:function", called with the folder and `device=`) is vlmkit's `load_adapter`
    unless a custom adapter needs its own.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    module, _, name = loader.partition(":")
    adapter = getattr(importlib.import_module(module), name)(model_dir, device=device)
    if getattr(adapter, "model", None) is not None:
        adapter.model.eval()
    return adapter


def model_unavailable(reason: str) -> APIError:
    return APIError(
        503,
        f"the model is unavailable ({reason}); see the server log",
        type="server_error",
        code="model_unavailable",
    )


class Engine(ABC):
    """Runs the model on submitted jobs, batching them itself, and counts prompts for admission."""

    limits: PromptLimits
    #: why the model can no longer answer (its process died), or None while it can.
    failure: str | None = None

    @abstractmethod
    def configure(self, max_batch_size: int, wait_s: float, short_first: int) -> None:
        """The batching policy's knobs (see batch_queue.py); set once, before the first job."""

    @abstractmethod
    def set_admitting(self, count: int) -> None:
        """How many requests are between parsing and `submit` (the batch window waits for them)."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queue `job`; its outcome reaches it through its own events, from the model's thread."""

    @abstractmethod
    def cancel(self, job: Job) -> None:
        """`job`'s client is gone: drop it if it still waits, end its row if it runs."""

    @abstractmethod
    async def prompt_tokens(self, messages: list[Message], sizes: list[tuple[int, int]]) -> int:
        """About how many tokens the prompt encodes to (see PromptCounter)."""

    @abstractmethod
    def stats(self) -> dict[str, object]:
        """Batches run so far: count, requests, largest and mean size."""

    @abstractmethod
    def close(self) -> None:
        """Stop the model; what it has not answered gets no further events."""


class ThreadEngine(Engine):
    """The model in one thread of this process, so it never runs concurrently with itself."""

    def __init__(self, adapter: ModelAdapter, max_context_tokens: int | None = None) -> None:
        self.adapter = adapter
        self.counter = PromptCounter(adapter, max_context_tokens)
        self.limits = self.counter.limits
        self.queue = BatchQueue()
        self._stats = BatchStats()
        self._count = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmkit-count")
        self._model = threading.Thread(
            target=serve_batches,
            args=(self.queue, lambda batch: run_batch(adapter, batch), self._stats),
            name="vlmkit-model",
            daemon=True,
        )
        self._model.start()

    def configure(self, max_batch_size: int, wait_s: float, short_first: int) -> None:
        self.queue.configure(max_batch_size, wait_s, short_first)

    def set_admitting(self, count: int) -> None:
        self.queue.set_admitting(count)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def cancel(self, job: Job) -> None:
        self.queue.discard(job)  # a running row reads job.cancelled at its next step

    async def prompt_tokens(self, messages: list[Message], sizes: list[tuple[int, int]]) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._count, self.counter.count, messages, sizes)

    def stats(self) -> dict[str, object]:
        return self._stats.as_dict()

    def close(self) -> None:
        self.queue.close()
        self._count.shutdown(wait=False, cancel_futures=True)
