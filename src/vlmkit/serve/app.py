"""The FastAPI app: OpenAI-compatible chat completions over a dynamic batcher, plus a web page.

`create_app` holds all state (settings, batcher, page) in the app it returns; nothing is global,
so tests can run several apps side by side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from vlmkit.errors import ConfigError
from vlmkit.models.adapters.base import ModelAdapter
from vlmkit.serve.admission import Admission
from vlmkit.serve.batching import Batcher, QueueFullError
from vlmkit.serve.conversation import generation_params
from vlmkit.serve.engine import Engine, ThreadEngine, model_unavailable
from vlmkit.serve.errors import APIError, bad_request, error_body, too_large
from vlmkit.serve.guards import HostGuard
from vlmkit.serve.jobs import Completion, Delta, EventKind, Job
from vlmkit.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ModelCard,
    ModelList,
    Usage,
)
from vlmkit.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


def create_app(model: ModelAdapter | Engine, settings: ServeSettings | None = None) -> FastAPI:
    """An app serving `model`: an adapter (run in one thread of this process) or an engine, e.g. a
    `ProcessEngine` that runs it in a child process (what `vlmkit serve` does).

    `app.state.drain()` is what a graceful shutdown awaits (see `vlmkit.serve.server`): new
    requests get 503, running ones get `shutdown_grace_s` to finish, the rest end with 503.
    """
    settings = settings or ServeSettings()
    if (
        not isinstance(model, Engine)
        and settings.model_process
        and "model_process" in settings.model_fields_set
    ):
        raise ConfigError(
            "model_process: true needs the model folder, not a loaded adapter: call serve(model_dir), or pass "
            "ProcessEngine.start(model_dir) (vlmkit.serve.engine_process) to create_app"
        )
    engine = model if isinstance(model, Engine) else ThreadEngine(model, settings.max_context_tokens)
    admission = Admission(engine, settings)
    batcher = Batcher(
        engine,
        max_batch_size=settings.max_batch_size,
        wait_s=settings.batch_wait_ms / 1000,
        short_first=settings.short_first_batches,
        max_queue=settings.max_queue,
        max_queued_bytes=settings.max_queued_image_bytes,
    )
    page = files("vlmkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    page_headers = _page_headers(page)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.aclose()
        admission.close()

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.batcher = batcher
    app.state.admission = admission
    app.state.draining = False

    async def drain() -> None:
        app.state.draining = True
        await batcher.drain(settings.shutdown_grace_s)

    app.state.drain = drain
    _add_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if "*" not in settings.allowed_hosts:
        app.add_middleware(HostGuard, allowed=settings.allowed_hosts)  # type: ignore[arg-type]
    auth = Depends(_api_key_check(settings.key()))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.failure is not None:
            return JSONResponse(model_unavailable(engine.failure).body(), status_code=503)
        return JSONResponse(
            {
                "status": "draining" if app.state.draining else "ok",
                "model": settings.model_name,
                "auth": settings.api_key is not None,
                "waiting": batcher.waiting,
                "context_tokens": admission.context,
                "batching": batcher.stats(),
            }
        )

    @app.get("/openapi.json", dependencies=[auth], include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, created=created)])

    @app.post("/v1/chat/completions", dependencies=[auth], response_model=None)
    async def chat_completions(request: Request) -> Response:
        if app.state.draining:
            raise _shutting_down()
        if engine.failure is not None:
            raise model_unavailable(engine.failure)
        _require_json(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout_s
        chat = _parse(await _read_body(request, settings.max_body_bytes, settings.body_timeout_s))
        params = generation_params(chat, settings)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            batcher.check_room()  # before decoding anything: a full queue refuses cheaply
            with batcher.admitting():  # submitted before the count drops: the window sees it arrive
                admitted = await admission.admit(chat, params, request_id)
                job = batcher.submit(
                    request_id,
                    admitted.sample,
                    admitted.params,
                    stream=bool(chat.stream),
                    nbytes=admitted.nbytes,
                )
        except QueueFullError as exc:
            raise APIError(
                429,
                f"server busy: {exc}; retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        meta = {"id": request_id, "created": int(time.time()), "model": settings.model_name}
        try:
            if not chat.stream:
                completion = await _wait(request, batcher, job, job.future, deadline)
                return JSONResponse(_completion_body(completion, meta))
            # wait until the prompt is encoded, so a request the model cannot take still gets a 4xx status
            first = await _wait(request, batcher, job, job.events.get(), deadline)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; the job is already cancelled
        if first[0] == "error":
            raise first[1]
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return StreamingResponse(
            _sse(batcher, job, first, meta, deadline, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


# -- request handling ---------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refusing (413) as soon as it exceeds `limit`, declared or streamed, and (408) a
    body still arriving after `timeout_s` (a client sending a byte every few seconds)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(
            f"request body is {declared} bytes; this server accepts at most {limit} (max_body_bytes)"
        )

    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"request body exceeds {limit} bytes (max_body_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout_s} s (body_timeout_s)",
            code="body_timeout",
            headers={"Connection": "close"},
        ) from None


def _require_json(request: Request) -> None:
    """JSON endpoints take only `application/json`: a `text/plain` POST needs no CORS preflight, so
    without this check any web page could make a browser run the model on a local server."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json (got {media_type or 'none'})",
            code="unsupported_media_type",
        )


def _shutting_down() -> APIError:
    return APIError(
        503, "the server is shutting down; retry later", type="server_error", code="shutting_down"
    )


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        # a union (content: str | list of parts) reports one error per branch; the deepest is the useful one
        first = max(exc.errors(), key=lambda error: len(error["loc"]))
        if first["type"] == "json_invalid":
            raise bad_request(f"request body is not valid JSON ({first['msg']})") from None
        where = ".".join(str(part) for part in first["loc"] if not _is_union_label(part))
        raise bad_request(f"invalid request: {where}: {first['msg']}", param=where or None) from None


def _is_union_label(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list"))


class _ClientGone(Exception):
    """The client closed its connection while its request waited."""


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only disconnects arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(request: Request, batcher: Batcher, job: Job, awaitable: Any, deadline: float) -> Any:
    """Await the job's result or first event within the request's time budget (504 after it);
    a client that leaves meanwhile cancels its job (_ClientGone), queued or already generating."""
    remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
    result = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            batcher.cancel(job)
    if result in done:
        return result.result()
    if gone in done:
        raise _ClientGone
    raise _timeout_error()


def _timeout_error() -> APIError:
    return APIError(
        504,
        "the request timed out waiting for the model (request_timeout_s)",
        type="server_error",
        code="timeout",
    )


def _completion_body(completion: Completion, meta: dict[str, Any]) -> dict[str, Any]:
    return ChatCompletion(
        **meta,
        choices=[
            Choice(
                index=index,
                message=AssistantMessage(content=choice.text),
                finish_reason=choice.finish_reason,
                logprobs=None if choice.logprobs is None else ChoiceLogprobs(content=choice.logprobs),
            )
            for index, choice in enumerate(completion.choices)
        ],
        usage=_usage(completion),
    ).model_dump()


def _usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _chunk(
    meta: dict[str, Any],
    delta: dict[str, str],
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: ChoiceLogprobs | None = None,
) -> str:
    choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
    chunk = ChatCompletionChunk(**meta, choices=[choice])
    return _event(chunk.model_dump(exclude={"usage"}))


def _error_event(payload: Any) -> str:
    if isinstance(payload, APIError):
        return _event(payload.body())
    return _event(error_body("internal error; see the server log", type="server_error"))


async def _sse(
    batcher: Batcher,
    job: Job,
    first: tuple[EventKind, Any],
    meta: dict[str, Any],
    deadline: float,
    include_usage: bool,
) -> AsyncIterator[str]:
    """OpenAI chunk events: role, content deltas, finish reason, optional usage, then [DONE].

    A stream that fails after it started (timeout, shutdown, model error) sends one error event
    and then `[DONE]`, so every client sees both why it ended and that it ended.
    """
    loop = asyncio.get_running_loop()
    try:
        for index in range(job.params.n):
            yield _chunk(meta, {"role": "assistant", "content": ""}, index=index)
        event: tuple[EventKind, Any] | None = first
        while True:
            if event is None:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=max(deadline - loop.time(), 0.0))
                except asyncio.TimeoutError:
                    yield _event(_timeout_error().body())
                    yield "data: [DONE]\n\n"
                    return
            kind, payload = event
            event = None
            if kind == "delta":
                delta: Delta = payload
                logprobs = None if delta.logprobs is None else ChoiceLogprobs(content=delta.logprobs)
                yield _chunk(meta, {"content": delta.text}, index=delta.index, logprobs=logprobs)
            elif kind == "error":
                yield _error_event(payload)
                yield "data: [DONE]\n\n"
                return
            elif kind == "done":
                for index, choice in enumerate(payload.choices):
                    yield _chunk(meta, {}, choice.finish_reason, index=index)
                if include_usage:
                    usage = ChatCompletionChunk(**meta, choices=[], usage=_usage(payload))
                    yield _event(usage.model_dump())
                yield "data: [DONE]\n\n"
                return
    finally:
        batcher.cancel(job)


# -- auth, errors, page ---------------------------------------------------------------------------------------
def _api_key_check(key: str | None) -> Any:
    async def check(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key; send the header Authorization: Bearer <key>",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(part) for part in first["loc"])
        return JSONResponse(error_body(f"invalid request: {where}: {first['msg']}"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), type=kind), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(
            error_body("internal error; see the server log", type="server_error"), status_code=500
        )


def _page_headers(page: str) -> dict[str, str]:
    """A strict CSP: only the page's own inline script runs, and it may only talk to this server."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    )
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
