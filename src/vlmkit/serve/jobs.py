"""A request in flight: what the model thread needs to answer it and how the answer gets back.

The model thread never touches asyncio objects directly: it schedules delivery onto the event
loop with `call_soon_threadsafe` (the process engine delivers from the loop itself, where it
reads the pipe), so each request's future (plain responses) or event queue (streams) is only
ever completed on the loop, in the order the model produced its events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmkit.data.sample import Sample
from vlmkit.serve.conversation import GenerationParams
from vlmkit.serve.schemas import TokenLogprob

EventKind = Literal["ready", "delta", "done", "error"]


@dataclass(frozen=True)
class ChoiceResult:
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Completion:
    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason


@dataclass(frozen=True)
class Delta:
    """New text of one choice, with the log-probabilities of the tokens it came from (if asked)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class Job:
    """One request. Methods ending in `_from_worker` are the ones the model thread may call."""

    id: str
    sample: Sample
    params: GenerationParams
    stream: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    events: asyncio.Queue[tuple[EventKind, Any]] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    #: decoded image bytes this request holds while it waits (bounded by max_queued_image_bytes)
    nbytes: int = 0
    #: its batch has started (the "ready" event arrived)
    started: bool = False
    #: called on the event loop with the job once its outcome (done or error) is delivered
    on_finish: Callable[[Job], None] | None = None

    @property
    def key(self) -> tuple[object, ...]:
        return self.params.batch_key(self.id)

    def deliver(self, kind: EventKind, payload: Any = None) -> None:
        """On the event loop: a stream gets every event, a plain request only its outcome."""
        if kind == "ready":
            self.started = True
        elif kind in ("done", "error") and self.on_finish is not None:
            self.on_finish(self)
        if self.stream:
            self.events.put_nowait((kind, payload))
        elif not self.future.done() and not self.cancelled:
            if kind == "done":
                self.future.set_result(payload)
            elif kind == "error":
                self.future.set_exception(payload)

    def notify_from_worker(self, kind: EventKind, payload: Any = None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
            self.loop.call_soon_threadsafe(self.deliver, kind, payload)

    def emit_from_worker(self, text: str, index: int = 0, logprobs: list[TokenLogprob] | None = None) -> None:
        self.notify_from_worker("delta", Delta(index, text, logprobs))
