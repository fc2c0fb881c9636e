"""What the model thread does with one batch: one `generate` call, answers routed back per request.

A request the adapter cannot encode (SampleError names it) fails alone and the rest of the batch
runs again; encoding happens inside `generate`, before any token, so nothing was streamed yet.
Prompt token counts come from the batch `generate` encoded itself (see `_recorded_encodes`),
so usage costs no second pass of the image processor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from transformers import LogitsProcessorList, StoppingCriteriaList

from vlmkit.errors import VlmkitError
from vlmkit.models.adapters.base import Batch, ModelAdapter, truncate_at_stop
from vlmkit.serve.errors import APIError
from vlmkit.serve.jobs import ChoiceResult, Completion, Job
from vlmkit.serve.streaming import (
    BatchStreamer,
    GenerationAbandoned,
    OpenAIPenalties,
    RowsCancelled,
    RowText,
    ScoreRecorder,
)

logger = logging.getLogger(__name__)


def run_batch(adapter: ModelAdapter, jobs: Sequence[Job]) -> None:
    """Answer `jobs` (which share generation settings) and deliver each outcome to its own job."""
    pending = [job for job in jobs if not job.cancelled]
    while pending:
        try:
            _generate(adapter, pending)
            return
        except GenerationAbandoned:
            logger.info("stopped a batch of %d: every request in it was cancelled", len(pending))
            return
        except VlmkitError as exc:  # raised while encoding: one request's fault
            culprit = next((job for job in pending if job.id == getattr(exc, "sample_id", None)), None)
            if culprit is None and len(pending) > 1:
                for job in pending:  # the error names no request: find it by running each alone
                    run_batch(adapter, [job])
                return
            bad = culprit or pending[0]
            bad.notify_from_worker("error", APIError(400, str(exc), code="invalid_sample"))
            pending.remove(bad)
        except _NothingGenerated as exc:  # e.g. out of memory in prefill: retry each request alone
            if len(pending) == 1:
                logger.error("generation failed for request %s", pending[0].id, exc_info=exc.__cause__)
                _fail(pending, exc)
                return
            logger.warning("a batch of %d failed before any token; running each alone", len(pending))
            for job in pending:
                run_batch(adapter, [job])
            return
        except Exception as exc:
            logger.exception("generation failed for a batch of %d", len(pending))
            _fail(pending, exc)
            return


class _NothingGenerated(Exception):
    """Generation failed before any row got a token, so each request can safely run again alone."""


def _fail(jobs: Sequence[Job], exc: Exception) -> None:
    """A 500 that names no internals: the exception itself (maybe an allocator message) is logged."""
    error = APIError(
        500,
        "the model failed while generating; see the server log",
        type="server_error",
        code="generation_failed",
    )
    for job in jobs:
        job.notify_from_worker("error", error)


def _generate(adapter: ModelAdapter, jobs: Sequence[Job]) -> None:
    """One `generate` call for all jobs; VlmkitError escapes only from encoding (before any token).

    Each request has `rows_per_request` rows (n sampled choices; greedy choices are one row shown
    n times), in request order, as transformers' `num_return_sequences` lays them out.
    """
    params = jobs[0].params
    per = params.rows_per_request
    rows: list[RowText] = []
    for job in jobs:
        for choice in range(per):
            rows.append(_row(adapter, job, choice, per))
    recorder = ScoreRecorder() if any(job.params.logprobs for job in jobs) else None
    processors = LogitsProcessorList()
    if params.presence_penalty or params.frequency_penalty:
        processors.append(OpenAIPenalties(params.presence_penalty, params.frequency_penalty))
    if recorder is not None:
        processors.append(recorder)
    cancelled_rows = RowsCancelled(lambda: [job.cancelled for job in jobs for _ in range(per)])

    def on_start() -> None:
        for job in jobs:
            job.notify_from_worker("ready")

    streamer = BatchStreamer(
        rows,
        adapter.stop_token_ids(),
        skip_prompt=adapter.generate_returns_prompt,
        on_start=on_start,
        abandoned=lambda: all(job.cancelled for job in jobs),
        scores=recorder,
    )
    options = params.generation_options()
    hooks: dict[str, object] = {"stopping_criteria": StoppingCriteriaList([cancelled_rows])}
    if processors:
        hooks["logits_processor"] = processors
    if options:
        hooks["generation_options"] = options
    try:
        with _recorded_encodes(adapter) as encoded:
            texts = adapter.generate(
                [job.sample for job in jobs],
                max_new_tokens=params.max_new_tokens,
                do_sample=params.do_sample,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=None,  # cut per request below: requests in one batch may have different stop strings
                seed=params.seed,
                streamer=streamer,
                **hooks,  # type: ignore[arg-type]
            )
    except VlmkitError as exc:
        if streamer.started:  # tokens were already streamed: the batch failed, not one request
            raise RuntimeError(str(exc)) from exc
        raise
    except GenerationAbandoned:
        raise
    except Exception as exc:
        if not any(row.saw_tokens and row.generated for row in rows):
            raise _NothingGenerated(type(exc).__name__) from exc
        raise
    if len(texts) != len(jobs) * per:
        raise RuntimeError(f"adapter returned {len(texts)} answers for {len(jobs) * per} rows")
    prompt_counts = _prompt_counts(adapter, jobs, encoded)
    for i, (job, n_prompt) in enumerate(zip(jobs, prompt_counts, strict=True)):
        choices: list[ChoiceResult] = []
        n_completion = 0
        for choice in range(per):
            row, text = rows[i * per + choice], texts[i * per + choice]
            answer = truncate_at_stop(text, job.params.stop)
            row.close(answer)
            if row.saw_tokens:
                generated = row.generated
            else:  # an adapter that ignores the streamer: count the answer's tokens instead
                generated = len(adapter.tokenizer(answer, add_special_tokens=False)["input_ids"])
            finish = "stop" if answer != text else row.finish_reason
            logprobs = row.logprobs if job.params.logprobs else None
            choices.append(ChoiceResult(answer, finish, logprobs))
            n_completion += generated
        if per == 1 and job.params.n > 1:  # greedy: every choice is the same answer
            choices = choices * job.params.n
            n_completion *= job.params.n
        job.notify_from_worker("done", Completion(choices, n_prompt, n_completion))


def _row(adapter: ModelAdapter, job: Job, choice: int, per: int) -> RowText:
    row = RowText(
        adapter.tokenizer,
        max_new_tokens=job.params.max_new_tokens,
        stop=job.params.stop,
        top_logprobs=job.params.top_logprobs if job.params.logprobs else None,
    )
    if job.stream:
        indices = [choice] if per > 1 else list(range(job.params.n))

        def emit(text: str) -> None:
            logprobs = row.take_logprobs()
            for index in indices:
                job.emit_from_worker(text, index, logprobs)

        row.emit = emit
    return row


@contextlib.contextmanager
def _recorded_encodes(adapter: ModelAdapter) -> Iterator[list[Batch]]:
    """Record the batches `adapter.encode` returns during one `generate` call.

    The adapter interface has no way to hand back the encoded prompt, and encoding again just to
    count tokens would run the image processor twice per request. So `encode` is shadowed on this
    instance for the duration of the call; only the model thread uses the adapter while serving.
    """
    seen: list[Batch] = []
    had_own = "encode" in vars(adapter)
    original = adapter.encode

    def encode(samples, *, train=True):  # type: ignore[no-untyped-def]
        batch = original(samples, train=train)
        seen.append(batch)
        return batch

    adapter.encode = encode  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        if had_own:
            adapter.encode = original  # type: ignore[method-assign]
        else:
            del adapter.encode


def _prompt_counts(adapter: ModelAdapter, jobs: Sequence[Job], encoded: list[Batch]) -> list[int]:
    """Prompt tokens per request (image tokens included), from the batch generate encoded."""
    if (
        len(encoded) == 1
        and "attention_mask" in encoded[0]
        and encoded[0]["attention_mask"].shape[0] == len(jobs)
    ):
        return [int(n) for n in encoded[0]["attention_mask"].sum(dim=1)]
    counts = []
    for job in jobs:  # an adapter whose generate does not go through encode: encode to count
        batch = adapter.encode([job.sample], train=False)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
    return counts
