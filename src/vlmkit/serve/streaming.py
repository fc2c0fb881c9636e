"""A transformers streamer for a batch: each step's tokens are split by row and turned into text deltas.

`generate` hands a streamer one tensor per step for the whole batch; serving needs each request's
own text as it grows. A row's streamed text is kept a prefix of the answer `generate` finally
returns (stripped, cut at stop strings): leading/trailing whitespace, a possible stop-string
prefix and half-decoded characters are held back until the next token settles them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from vlmkit.serve.schemas import TokenLogprob, TopLogprob

logger = logging.getLogger(__name__)


class Decoder(Protocol):
    """The one tokenizer method rows need (so fakes in tests can be tiny)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class RowText:
    """One request's share of a batched generation: its new tokens, finish state and streamed text."""

    def __init__(
        self,
        decoder: Decoder,
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        emit: Callable[[str], None] | None = None,
        top_logprobs: int | None = None,
    ) -> None:
        """`top_logprobs`: None records no log-probabilities; k records each token's and its top k."""
        self.decoder = decoder
        self.top_logprobs = top_logprobs
        self.logprobs: list[TokenLogprob] = []
        self._logprobs_taken = 0
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.emit = emit
        self.tokens: list[int] = []
        self.generated = 0  # tokens the model produced for this row, up to and including its end token
        self.saw_tokens = False
        self.hit_end = False
        self.hit_stop = False
        self.sent = ""

    @property
    def finished(self) -> bool:
        return self.hit_end or self.hit_stop

    @property
    def finish_reason(self) -> str:
        if self.finished or self.generated < self.max_new_tokens:
            return "stop"
        return "length"

    def add(self, token: int, end_ids: frozenset[int], logprobs: torch.Tensor | None = None) -> None:
        """One generated token; `logprobs` is this step's log-softmax row when they are recorded."""
        self.saw_tokens = True
        if self.finished:
            return  # generate keeps padding finished rows until the whole batch is done
        self.generated += 1
        if token in end_ids:
            self.hit_end = True
            return
        self.tokens.append(token)
        if logprobs is not None and self.top_logprobs is not None:
            self.logprobs.append(self._logprob_entry(token, logprobs))
        if self.emit is not None or self.stop:
            self._advance()

    def _logprob_entry(self, token: int, logprobs: torch.Tensor) -> TokenLogprob:
        """The chosen token (already appended) and its top alternatives, each as the text it adds
        after the tokens before it (a lone word piece decodes without its leading space)."""
        prefix = self.tokens[:-1]
        before = self.decoder.decode(prefix, skip_special_tokens=False) if prefix else ""
        top: list[TopLogprob] = []
        if self.top_logprobs:
            values, ids = logprobs.topk(self.top_logprobs)
            top = [
                self._top(prefix, before, int(i), float(v))
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            ]
        entry = self._top(prefix, before, token, float(logprobs[token]))
        return TokenLogprob(**entry.model_dump(), top_logprobs=top)

    def _top(self, prefix: list[int], before: str, token: int, logprob: float) -> TopLogprob:
        after = self.decoder.decode([*prefix, token], skip_special_tokens=False)
        text = after[len(before) :] if after.startswith(before) else self.decoder.decode([token])
        return TopLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(text.encode("utf-8")))

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """Entries recorded since the last call (for a stream chunk); None when none are recorded."""
        if self.top_logprobs is None:
            return None
        new = self.logprobs[self._logprobs_taken :]
        self._logprobs_taken = len(self.logprobs)
        return new

    def _advance(self) -> None:
        text = self.decoder.decode(self.tokens, skip_special_tokens=True).lstrip()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.hit_stop = True
            self._send(text[: min(cuts)].rstrip())
            return
        held = _stop_prefix_length(text, self.stop)
        self._send(text[: len(text) - held].rstrip().rstrip("\ufffd").rstrip())

    def _send(self, visible: str) -> None:
        if self.emit is not None and len(visible) > len(self.sent) and visible.startswith(self.sent):
            self.emit(visible[len(self.sent) :])
            self.sent = visible

    def close(self, final_text: str) -> None:
        """Send whatever of the final answer has not been streamed yet."""
        if self.emit is None or final_text == self.sent:
            return
        if final_text.startswith(self.sent):
            self.emit(final_text[len(self.sent) :])
            self.sent = final_text
        else:  # a tokenizer whose decoding of a prefix is not a prefix of the full decoding
            logger.warning("streamed text %r is not a prefix of the final answer %r", self.sent, final_text)


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could be the start of a stop string."""
    longest = max((len(s) for s in stops), default=0)
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class GenerationAbandoned(Exception):
    """Raised from `put` to stop `generate` early when no request in the batch still wants its answer."""


class BatchStreamer(BaseStreamer):
    """Routes each step's (batch,) or (batch, k) token tensor to its rows.

    With `skip_prompt` (adapters whose `generate` returns the prompt) the first `put`, the prompt
    ids, is dropped; without it the first `put` is the empty (batch, 0) start of the new tokens.
    `on_start` runs at the first `put`, i.e. once the prompts are encoded and generation began.
    When `abandoned()` turns true (every client timed out or left), the next `put` raises
    GenerationAbandoned so the model is freed for the requests still waiting.
    """

    def __init__(
        self,
        rows: Sequence[RowText],
        end_ids: Iterable[int],
        *,
        skip_prompt: bool,
        on_start: Callable[[], None] | None = None,
        abandoned: Callable[[], bool] | None = None,
        scores: ScoreRecorder | None = None,
    ) -> None:
        self.scores = scores
        self.rows = list(rows)
        self.end_ids = frozenset(int(i) for i in end_ids)
        self._skip_next = skip_prompt
        self._on_start = on_start
        self._abandoned = abandoned
        self.started = False
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:
            self.started = True
            if self._on_start is not None:
                self._on_start()
        if self._abandoned is not None and self._abandoned():
            raise GenerationAbandoned
        if self._skip_next:
            self._skip_next = False
            return
        tokens = value.reshape(value.shape[0], -1) if value.dim() > 1 else value.reshape(-1, 1)
        if tokens.shape[0] != len(self.rows):
            logger.warning(
                "streamer got %d rows for a batch of %d; ignoring", tokens.shape[0], len(self.rows)
            )
            return
        step = self.scores.take() if self.scores is not None and tokens.shape[1] == 1 else None
        for index, (row, row_tokens) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            for token in row_tokens:
                row.add(int(token), self.end_ids, None if step is None else step[index])

    def end(self) -> None:
        self.ended = True


class ScoreRecorder(LogitsProcessor):
    """Keeps the last step's log-probabilities (after penalties, before temperature/top-p: custom
    processors run before transformers' sampling warpers) for the streamer to read per token."""

    def __init__(self) -> None:
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._last = torch.log_softmax(scores.float(), dim=-1).cpu()
        return scores

    def take(self) -> torch.Tensor | None:
        last, self._last = self._last, None
        return last


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties over the tokens generated so far (not the prompt):
    logit -= presence * [count > 0] + frequency * count, per row."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self._prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt_width is None:  # the first call sees only the prompt (empty with inputs_embeds)
            self._prompt_width = input_ids.shape[1]
        generated = input_ids[:, self._prompt_width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class RowsCancelled(StoppingCriteria):
    """Ends the rows whose request was cancelled (client gone, timed out) at the next step."""

    def __init__(self, cancelled: Callable[[], list[bool]]) -> None:
        self.cancelled = cancelled

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        flags = self.cancelled()
        if len(flags) != input_ids.shape[0]:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)
