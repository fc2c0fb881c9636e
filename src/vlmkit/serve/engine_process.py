"""The model in a child process of its own (what `vlmkit serve` runs), talking over one pipe.

The server's process parses HTTP, refuses bad requests and decodes images; the child loads the
model folder, batches the jobs it is sent and runs `run_batch` on each batch, exactly as the thread
engine does, with stand-in jobs whose events travel back over the pipe. Two processes means two
GILs: under a flood of cheap bad requests the model keeps its own core (see docs/serving.md).

Messages, parent -> child: ("configure", max_batch_size, wait_s, short_first), ("admitting", count), ("job",
(id, sample, params, stream)), ("cancel", job id), ("count", id, messages, sizes), ("stop",). Child -> parent:
("ready", PromptLimits) or ("failed", message) once, then ("event", job id, kind, payload),
("batch", size), ("count", id, tokens, error). Jobs are sent as soon as they are admitted and
batched in the child (batch_queue.py), so the model never waits for the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from vlmkit.data.sample import Message, Sample
from vlmkit.errors import VlmkitError
from vlmkit.serve.batch_queue import BatchQueue, BatchStats, serve_batches
from vlmkit.serve.conversation import GenerationParams
from vlmkit.serve.engine import DEFAULT_LOADER, Engine, load_served_adapter, model_unavailable
from vlmkit.serve.jobs import Delta, EventKind, Job
from vlmkit.serve.prompt_length import PromptLimits

logger = logging.getLogger(__name__)


class ProcessEngine(Engine):
    """Parent side, all on the server's event loop: messages are sent from it and read by an
    `add_reader` callback. Threads here would each wait for this process's GIL, held by the busy
    loop, for up to a switch interval (5 ms) per message: that halved the batch sizes under load."""

    def __init__(self, process: Any, conn: Connection, limits: PromptLimits) -> None:
        self.process = process
        self.limits = limits
        self._conn = conn
        self._ids = itertools.count()
        self._jobs: dict[str, Job] = {}
        self._counts: dict[int, asyncio.Future[Any]] = {}
        self._stats = BatchStats()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def start(
        cls,
        model_dir: str,
        *,
        device: str | None = None,
        max_context_tokens: int | None = None,
        log_level: str = "info",
        timeout_s: float = 1800.0,
        loader: str = DEFAULT_LOADER,
    ) -> ProcessEngine:
        """Spawn the child and wait until its model is loaded (a load error is one VlmkitError line).

        `loader` builds the adapter in the child (see `load_served_adapter`).
        """
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA/threads
        parent, child = context.Pipe()
        process = context.Process(
            target=engine_main,
            args=(child, model_dir, device, max_context_tokens, log_level, loader),
            name="vlmkit-model",
            daemon=True,
        )
        process.start()
        child.close()  # so the parent sees EOF when the child exits
        try:
            while not parent.poll(0.5):
                if not process.is_alive():
                    raise VlmkitError(
                        f"the model process exited with code {process.exitcode} while loading {model_dir}"
                    )
                timeout_s -= 0.5
                if timeout_s <= 0:
                    raise VlmkitError(f"the model process did not load {model_dir} in time")
            kind, payload = parent.recv()
        except (EOFError, OSError):
            kind, payload = "failed", f"the model process exited with code {process.exitcode} while loading"
        except BaseException:
            process.kill()
            raise
        if kind != "ready":
            process.join(10)
            raise VlmkitError(str(payload))
        return cls(process, parent, payload)

    # -- Engine --------------------------------------------------------------------------------------
    def configure(self, max_batch_size: int, wait_s: float, short_first: int) -> None:
        self._send(("configure", max_batch_size, wait_s, short_first))

    def set_admitting(self, count: int) -> None:
        self._send(("admitting", count))

    def submit(self, job: Job) -> None:
        self._attach()
        if self.failure is not None:
            job.deliver("error", model_unavailable(self.failure))
            return
        self._jobs[job.id] = job
        self._send(("job", (job.id, job.sample, job.params, job.stream)))

    def cancel(self, job: Job) -> None:
        if self._jobs.pop(job.id, None) is not None:
            self._send(("cancel", job.id))

    async def prompt_tokens(self, messages: list[Message], sizes: list[tuple[int, int]]) -> int:
        self._attach()
        if self.failure is not None:
            raise model_unavailable(self.failure)
        number = next(self._ids)
        future = self._counts[number] = asyncio.get_running_loop().create_future()
        self._send(("count", number, messages, sizes))
        return await future

    def stats(self) -> dict[str, object]:
        return self._stats.as_dict()

    def close(self) -> None:
        self._closing = True
        self._send(("stop",))
        self.process.join(15)
        if self.process.is_alive():
            logger.warning("the model process did not stop within 15 s; killing it")
            self.process.kill()
            self.process.join(5)
        self._detach()
        self._died()

    # -- plumbing --------------------------------------------------------------------------------------
    def _attach(self) -> None:
        """Read the pipe from the running loop (the engine is built before uvicorn's loop exists)."""
        if self._loop is None and self.failure is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                self._loop.remove_reader(self._conn.fileno())
        self._loop = None

    def _send(self, message: tuple[Any, ...]) -> None:
        if self.failure is not None:
            return
        try:
            self._conn.send(message)
        except (OSError, ValueError):  # the child is gone
            self._died()

    def _on_readable(self) -> None:
        for _ in range(1024):  # then let other callbacks run; the loop calls again while data waits
            try:
                if not self._conn.poll():
                    return
                message = self._conn.recv()
            except (EOFError, OSError):
                self._detach()
                self._died()
                return
            self._dispatch(message)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "event":
            _, job_id, event, payload = message
            job = self._jobs.pop(job_id, None) if event in ("done", "error") else self._jobs.get(job_id)
            if job is not None:
                job.deliver(event, payload)
        elif kind == "batch":
            self._stats.record(message[1])
        elif kind == "count":
            _, number, tokens, error = message
            future = self._counts.pop(number, None)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(tokens)
                else:
                    future.set_exception(RuntimeError(error))

    def _died(self) -> None:
        """The child is gone: every request still waiting on it gets 503 (on the loop)."""
        if self.failure is None:
            self.process.join(5)
            self.failure = (
                "shut down"
                if self._closing
                else f"the model process exited with code {self.process.exitcode}"
            )
            if not self._closing:
                logger.error("%s; requests now get 503", self.failure)
        error = model_unavailable(self.failure)
        jobs, self._jobs = list(self._jobs.values()), {}
        counts, self._counts = list(self._counts.values()), {}
        for job in jobs:
            job.deliver("error", error)
        for future in counts:
            if not future.done():
                future.set_exception(error)


# -- the child -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class RemoteJob:
    """A job as `run_batch` sees it in the child: its events go back over the pipe."""

    id: str
    sample: Sample
    params: GenerationParams
    stream: bool
    send: Callable[[tuple[Any, ...]], None]
    cancelled: bool = False

    @property
    def key(self) -> tuple[object, ...]:
        return self.params.batch_key(self.id)

    def notify_from_worker(self, kind: EventKind, payload: Any = None) -> None:
        self.send(("event", self.id, kind, payload))

    def emit_from_worker(self, text: str, index: int = 0, logprobs: Any = None) -> None:
        self.notify_from_worker("delta", Delta(index, text, logprobs))


def engine_main(
    conn: Connection,
    model_dir: str,
    device: str | None,
    max_context_tokens: int | None,
    log_level: str,
    loader: str = DEFAULT_LOADER,
) -> None:
    """Child entry point: load, report ready, then run batches until told to stop or orphaned."""
    # Ctrl-C reaches the whole process group; the parent drains in-flight requests (which needs
    # this process) and then sends "stop". SIGTERM keeps its default: it is how multiprocessing
    # stops a daemonic child when its parent exits (ignoring it hung the parent's exit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level = getattr(logging, log_level.upper(), logging.INFO)  # uvicorn's "trace" is not a logging level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s [model]: %(message)s")
    try:
        from vlmkit.serve.prompt_length import PromptCounter
        from vlmkit.serve.worker import run_batch

        adapter = load_served_adapter(model_dir, device, loader)
        counter = PromptCounter(adapter, max_context_tokens)
    except VlmkitError as exc:
        conn.send(("failed", str(exc)))
        return
    except Exception as exc:
        logger.exception("loading %s failed", model_dir)
        conn.send(("failed", f"loading {model_dir} failed: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", counter.limits))
    gc.freeze()  # the model and libraries stay: full collections need not walk them (tail latency)

    lock = threading.Lock()
    queue = BatchQueue()
    jobs: dict[str, RemoteJob] = {}

    def send(message: tuple[Any, ...]) -> None:
        with lock:
            conn.send(message)

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the server process is gone: nobody is left to answer
            kind = message[0]
            if kind == "job":
                job = RemoteJob(*message[1], send=send)
                jobs[job.id] = job
                queue.put(job)
            elif kind == "cancel":
                cancelled = jobs.pop(message[1], None)
                if cancelled is not None:
                    cancelled.cancelled = True  # a running row stops at its next step
                    queue.discard(cancelled)
            elif kind == "count":
                _, number, messages, sizes = message
                try:
                    send(("count", number, counter.count(messages, sizes), None))
                except Exception as exc:
                    logger.exception("counting a prompt failed")
                    send(("count", number, None, type(exc).__name__))
            elif kind == "configure":
                queue.configure(*message[1:])
            elif kind == "admitting":
                queue.set_admitting(message[1])
            elif kind == "stop":
                queue.close()
                return

    def run(batch: list[RemoteJob]) -> None:
        send(("batch", len(batch)))
        try:
            run_batch(adapter, batch)  # type: ignore[arg-type]
        finally:
            for job in batch:
                jobs.pop(job.id, None)

    threading.Thread(target=receive, name="vlmkit-engine-receive", daemon=True).start()
    serve_batches(queue, run)
