"""The HTTP server: OpenAI-compatible API, limits, dynamic batching and per-request routing.

Most tests drive a live uvicorn server on 127.0.0.1 backed by `EchoAdapter`, a deterministic fake
whose answer is derived from the question (so every response can be checked against its own
request) and which records its batches; the tiny random VLM then runs end to end with the
official `openai` client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from vlmkit.data.sample import Sample  # noqa: E402
from vlmkit.errors import SampleError  # noqa: E402
from vlmkit.models.adapters.base import ModelAdapter, truncate_at_stop  # noqa: E402
from vlmkit.serve import ServeSettings  # noqa: E402
from vlmkit.serve.app import create_app  # noqa: E402
from vlmkit.serve.conversation import GenerationParams  # noqa: E402
from vlmkit.serve.errors import APIError  # noqa: E402
from vlmkit.serve.images import decode_data_url, decode_image  # noqa: E402
from vlmkit.serve.server import make_server  # noqa: E402
from vlmkit.serve.streaming import BatchStreamer, RowText  # noqa: E402

KEY = "test-key-123"


# -- helpers ------------------------------------------------------------------------------------------
class CharTokenizer:
    """Token = character code + 10; 0 is padding, 1 ends a turn."""

    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 10 for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


def echo_answer(question: str) -> str:
    return f"you asked: {question}"


class EchoAdapter(ModelAdapter):
    """A deterministic stand-in model: answers `echo_answer(question)` one character per step.

    Records every generate call's (batch size, max_new_tokens) and whether two calls ever overlapped.
    """

    generate_returns_prompt = False

    def __init__(self, step_s: float = 0.0) -> None:
        self.tokenizer = CharTokenizer()  # type: ignore[assignment]
        self.step_s = step_s
        self.batches: list[tuple[int, int]] = []
        self.overlapped = False
        self._running = threading.Lock()

    @classmethod
    def load(cls, path: Any, **kwargs: Any) -> EchoAdapter:
        raise NotImplementedError

    def save(self, out_dir: Any) -> None:
        raise NotImplementedError

    def stop_token_ids(self) -> list[int]:
        return [1]

    def encode(self, samples: Sequence[Sample], *, train: bool = True) -> dict[str, torch.Tensor]:
        for sample in samples:
            if "BAD" in sample.prompt_messages()[-1]["content"]:
                raise SampleError(sample.id, "this prompt cannot be encoded")
        ids = [self.tokenizer.encode(s.prompt_messages()[-1]["content"]) for s in samples]
        width = max(len(row) for row in ids)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        return {"input_ids": mask.clone(), "attention_mask": mask}

    def generate(
        self, samples: Sequence[Sample], *, max_new_tokens: int = 32, stop=None, streamer=None, **_: Any
    ):
        if not self._running.acquire(blocking=False):
            self.overlapped = True
            self._running.acquire()
        try:
            self.encode(samples, train=False)  # like real adapters: encoding happens inside generate
            self.batches.append((len(samples), max_new_tokens))
            questions = [s.prompt_messages()[-1]["content"] for s in samples]
            targets = [[*self.tokenizer.encode(echo_answer(q)), 1][:max_new_tokens] for q in questions]
            if streamer is not None:
                streamer.put(torch.zeros((len(samples), 0), dtype=torch.long))
            for step in range(max(len(t) for t in targets)):
                if streamer is not None:
                    streamer.put(torch.tensor([t[step] if step < len(t) else 0 for t in targets]))
                if self.step_s:
                    time.sleep(self.step_s)
            if streamer is not None:
                streamer.end()
            return [truncate_at_stop(self.tokenizer.decode(t).strip(), stop) for t in targets]
        finally:
            self._running.release()


def png_bytes(size: tuple[int, int] = (8, 8), color: str = "red", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: tiny on disk, huge once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


RED = data_url(png_bytes())


def chat_body(question: str, image: str | None = RED, **options: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"model": "vlmkit", "messages": [{"role": "user", "content": content}], **options}


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run `app` under uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, app.state.settings, log_level="warning", lifespan="on")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def echo_server(step_s: float = 0.0, **settings: Any) -> Iterator[tuple[str, EchoAdapter]]:
    adapter = EchoAdapter(step_s=step_s)
    with live_server(create_app(adapter, ServeSettings(**settings))) as url:
        yield url, adapter


def assert_error_shape(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


async def post_many(
    url: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for body in bodies))


def sse_text(response: httpx.Response) -> tuple[str, str | None, list[str]]:
    """Concatenated content, the finish reason and the raw data lines of an SSE response."""
    lines = [line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    import json

    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finish = next(
        (
            c["choices"][0]["finish_reason"]
            for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"]
        ),
        None,
    )
    return text, finish, lines


# -- units ---------------------------------------------------------------------------------------------
def test_streamer_routes_each_row_and_skips_a_returned_prompt() -> None:
    tok = CharTokenizer()
    got: list[list[str]] = [[], []]
    rows = [RowText(tok, max_new_tokens=8, emit=got[i].append) for i in range(2)]
    streamer = BatchStreamer(rows, end_ids=[1], skip_prompt=True)
    streamer.put(torch.tensor([tok.encode("PROMPT"), tok.encode("prompt")]))  # the prompt comes back first
    for a, b in zip("ab", "xy", strict=True):
        streamer.put(torch.tensor([tok.encode(a)[0], tok.encode(b)[0]]))
    streamer.put(torch.tensor([1, tok.encode("z")[0]]))  # row 0 ends
    streamer.put(torch.tensor([tok.encode("!")[0], 1]))  # row 0 is padded with junk after its end
    streamer.end()
    assert "".join(got[0]) == "ab" and "".join(got[1]) == "xyz"
    assert rows[0].generated == 3 and rows[0].finish_reason == "stop"
    assert rows[1].generated == 4


def test_streamer_holds_back_whitespace_and_stop_prefixes() -> None:
    tok = CharTokenizer()
    sent: list[str] = []
    row = RowText(tok, max_new_tokens=20, stop=["END"], emit=sent.append)
    streamer = BatchStreamer([row], end_ids=[1], skip_prompt=False)
    for char in " hi E":
        streamer.put(torch.tensor([tok.encode(char)[0]]))
    assert "".join(sent) == "hi"  # leading space dropped; trailing " E" might start "END"
    for char in "ND more":
        streamer.put(torch.tensor([tok.encode(char)[0]]))
    assert "".join(sent) == "hi" and row.hit_stop and row.finish_reason == "stop"
    row.close("hi")
    assert "".join(sent) == "hi"


def test_length_finish_reason() -> None:
    tok = CharTokenizer()
    row = RowText(tok, max_new_tokens=2)
    BatchStreamer([row], end_ids=[1], skip_prompt=False).put(torch.tensor([[20, 21]]))
    assert row.generated == 2 and row.finish_reason == "length"


def test_batch_keys_group_only_compatible_requests() -> None:
    greedy = GenerationParams(max_new_tokens=8)
    assert greedy.batch_key("a") == GenerationParams(max_new_tokens=8, stop=("x",)).batch_key("b")
    assert greedy.batch_key("a") != GenerationParams(max_new_tokens=9).batch_key("a")
    sampled = GenerationParams(max_new_tokens=8, do_sample=True, temperature=0.7)
    assert sampled.batch_key("a") == sampled.batch_key("b") != greedy.batch_key("a")
    seeded = GenerationParams(max_new_tokens=8, do_sample=True, temperature=0.7, seed=1)
    assert seeded.batch_key("a") != seeded.batch_key("b")  # seeded sampling runs alone


def test_image_limits() -> None:
    settings = ServeSettings(max_image_bytes=1000, max_image_pixels=64 * 64)
    assert decode_image(decode_data_url(RED, settings), settings).size == (8, 8)
    with pytest.raises(APIError) as big:
        decode_data_url(data_url(b"x" * 2000), settings)
    assert big.value.status == 413
    with pytest.raises(APIError) as many:
        decode_image(png_bytes((65, 64)), settings)
    assert many.value.status == 400 and many.value.code == "image_too_many_pixels"
    with pytest.raises(APIError) as junk:
        decode_image(b"not an image", settings)
    assert junk.value.status == 400
    with pytest.raises(APIError):
        decode_data_url("data:image/png;base64,@@@@", settings)


def test_pixel_bomb_is_refused_before_decoding() -> None:
    bomb = bomb_png(20000, 20000)  # 400 megapixels in a few tens of KB
    assert len(bomb) < 200_000
    with Image.open(io.BytesIO(bomb_png(30, 20))) as small:
        assert small.size == (30, 20) and small.convert("L").getpixel((0, 0)) == 0  # the crafted PNG is valid
    with pytest.raises(APIError) as refused:
        decode_image(bomb, ServeSettings())
    assert refused.value.status == 400 and refused.value.code == "image_too_many_pixels"


# -- live server with the fake adapter -------------------------------------------------------------------
def test_page_health_and_models() -> None:
    with echo_server(model_name="echo") as (url, _):
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<script>" in page.text
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        assert "http" not in page.text.split("<script>")[0].replace("http-equiv", "")  # no external assets
        assert httpx.get(url + "/health").json()["status"] == "ok"
        models = openai.OpenAI(base_url=url + "/v1", api_key="unused").models.list()
        assert [m.id for m in models.data] == ["echo"]
        assert_error_shape(httpx.get(url + "/v1/nope"), 404)


def test_api_key_required_when_set() -> None:
    with echo_server(api_key=KEY) as (url, _):
        assert_error_shape(
            httpx.post(url + "/v1/chat/completions", json=chat_body("hi")), 401, "invalid_api_key"
        )
        wrong = httpx.post(
            url + "/v1/chat/completions", json=chat_body("hi"), headers={"Authorization": "Bearer nope"}
        )
        assert_error_shape(wrong, 401)
        assert_error_shape(httpx.get(url + "/v1/models"), 401)
        assert httpx.get(url + "/health").json()["auth"] is True
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        reply = client.chat.completions.create(model="vlmkit", messages=chat_body("hi")["messages"])
        assert reply.choices[0].message.content == echo_answer("hi")


def test_openai_client_against_fake_adapter() -> None:
    with echo_server() as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        messages = chat_body("what colour?")["messages"]
        reply = client.chat.completions.create(model="vlmkit", messages=messages, max_tokens=64)
        expected = echo_answer("what colour?")
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == len(expected) + 1  # the end-of-turn token counts
        assert reply.usage.prompt_tokens == len("what colour?")
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

        short = client.chat.completions.create(model="vlmkit", messages=messages, max_tokens=5)
        assert short.choices[0].message.content == expected[:5] and short.choices[0].finish_reason == "length"

        cut = client.chat.completions.create(model="vlmkit", messages=messages, stop=["col"])
        assert cut.choices[0].message.content == "you asked: what" and cut.choices[0].finish_reason == "stop"

        stream = client.chat.completions.create(
            model="vlmkit", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(deltas) == expected and len(deltas) > 3  # really streamed, piece by piece
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(expected) + 1

        streamed_cut = client.chat.completions.create(
            model="vlmkit", messages=messages, stream=True, stop="col"
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed_cut if c.choices) == "you asked: what"
        )


def test_rejections_are_openai_errors() -> None:
    bomb = data_url(bomb_png(5000, 5000))
    big_image = data_url(png_bytes() + b"\0" * 5000)
    with echo_server(
        max_body_bytes=20_000, max_image_bytes=4_000, max_image_pixels=1_000_000, max_tokens_cap=100
    ) as (url, _):
        cases: list[tuple[Any, int, str | None]] = [
            (chat_body("q", image="https://example.com/cat.png"), 400, "remote_images_disabled"),
            (chat_body("q", image="http://169.254.169.254/latest/meta-data"), 400, "remote_images_disabled"),
            (chat_body("q", image="file:///etc/passwd"), 400, None),
            (chat_body("q", image=None), 400, "image_required"),
            (chat_body("q", n=99), 400, None),  # over max_n
            (chat_body("q", seed=2**63), 400, None),
            (chat_body("q", response_format={"type": "json_object"}), 400, "unsupported_parameter"),
            (chat_body("q", max_tokens=101), 400, None),
            (chat_body("q", temperature=5), 400, None),
            (chat_body("q", image=bomb), 400, "image_too_many_pixels"),
            (chat_body("q", image=big_image), 413, "image_too_large"),
            (chat_body("q" * 30_000), 413, None),
            ({"messages": []}, 400, None),
            ({"messages": [{"role": "tool", "content": "x"}]}, 400, None),
        ]
        two_images = chat_body("q")
        two_images["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": RED}})
        cases.append((two_images, 400, "too_many_images"))
        for body, status, code in cases:
            assert_error_shape(httpx.post(url + "/v1/chat/completions", json=body), status, code)
        json_header = {"Content-Type": "application/json"}
        not_json = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=json_header)
        assert_error_shape(not_json, 400)
        with pytest.raises(openai.BadRequestError, match="remote image URLs are disabled"):
            openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(
                model="m", messages=chat_body("q", image="https://example.com/a.png")["messages"]
            )


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://localhost/secret")
            self.end_headers()
            return
        body = png_bytes() if self.path == "/red.png" else png_bytes() + os.urandom(5000)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_remote_images_only_from_allowed_hosts() -> None:
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    try:
        with echo_server(allowed_image_hosts=["127.0.0.1"], max_image_bytes=2_000) as (url, _):
            ok = httpx.post(url + "/v1/chat/completions", json=chat_body("remote?", image=base + "/red.png"))
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == echo_answer(
                "remote?"
            )
            other = chat_body("q", image=base.replace("127.0.0.1", "localhost") + "/red.png")
            assert_error_shape(
                httpx.post(url + "/v1/chat/completions", json=other), 400, "image_host_not_allowed"
            )
            redirect = chat_body("q", image=base + "/redirect")
            assert_error_shape(
                httpx.post(url + "/v1/chat/completions", json=redirect), 400, "image_fetch_failed"
            )
            large = chat_body("q", image=base + "/large.png")
            assert_error_shape(httpx.post(url + "/v1/chat/completions", json=large), 413, "image_too_large")
    finally:
        images.shutdown()


def test_queue_full_gives_429() -> None:
    with echo_server(step_s=0.02, max_batch_size=1, max_queue=2, batch_wait_ms=0) as (url, _):
        responses = asyncio.run(post_many(url, [chat_body(f"q{i}") for i in range(8)]))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(429) >= 5 and set(statuses) == {200, 429}, statuses
        for response in responses:
            if response.status_code == 429:
                assert_error_shape(response, 429, "queue_full")
            else:
                question = response.json()["choices"][0]["message"]["content"]
                assert question.startswith("you asked: q")


def test_slow_requests_time_out_with_504_and_free_the_model() -> None:
    with echo_server(step_s=0.05, request_timeout_s=0.5) as (url, adapter):
        slow = chat_body("a question that takes about two seconds to answer")
        assert_error_shape(httpx.post(url + "/v1/chat/completions", json=slow), 504, "timeout")
        # the abandoned generation stops at its next step, so a short request right after still fits
        fast = httpx.post(url + "/v1/chat/completions", json=chat_body("q", max_tokens=3))
        assert fast.status_code == 200, fast.text
        assert not adapter.overlapped
        # a stream that already started cannot change its status: it ends with an OpenAI error event
        stream = httpx.post(url + "/v1/chat/completions", json=dict(slow, stream=True))
        assert stream.status_code == 200
        events = [line for line in stream.text.split("\n\n") if line.startswith("data: ")]
        assert '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]"
        with pytest.raises(openai.APIError, match="timed out"):
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            list(client.chat.completions.create(model="m", messages=slow["messages"], stream=True))


def test_concurrent_requests_are_batched_and_routed_to_their_own_request() -> None:
    with echo_server(step_s=0.002, max_batch_size=8, batch_wait_ms=20) as (url, adapter):
        bodies = [
            chat_body(f"question number {i}", max_tokens=20 + i % 3 * 10, stream=i % 2 == 0)
            for i in range(48)
        ]
        responses = asyncio.run(post_many(url, bodies))
        for i, (body, response) in enumerate(zip(bodies, responses, strict=True)):
            assert response.status_code == 200, response.text
            expected = echo_answer(f"question number {i}")[: body["max_tokens"]].strip()
            if body["stream"]:
                text, finish, _ = sse_text(response)
            else:
                text = response.json()["choices"][0]["message"]["content"]
                finish = response.json()["choices"][0]["finish_reason"]
            assert text == expected, (i, text)
            assert finish == (
                "length" if len(echo_answer(f"question number {i}")) >= body["max_tokens"] else "stop"
            )
        sizes = [size for size, _ in adapter.batches]
        assert sum(sizes) == 48 and max(sizes) > 1 and max(sizes) <= 8, adapter.batches
        assert {tokens for _, tokens in adapter.batches} == {20, 30, 40}  # batches never mix max_tokens
        assert not adapter.overlapped  # the model never ran concurrently with itself
        health = httpx.get(url + "/health").json()["batching"]
        assert health["requests"] == 48 and health["largest_batch"] == max(sizes)


def test_a_request_the_model_cannot_encode_fails_alone() -> None:
    with echo_server(step_s=0.002, max_batch_size=8, batch_wait_ms=50) as (url, adapter):
        bodies = [chat_body(f"q{i}" if i != 3 else "a BAD question", stream=i % 2 == 1) for i in range(6)]
        bodies.append(chat_body("another BAD one"))
        responses = asyncio.run(post_many(url, bodies))
        for i, response in enumerate(responses):
            if i in (3, 6):
                assert_error_shape(response, 400, "invalid_sample")  # a stream too: 400 before any event
            else:
                assert response.status_code == 200, response.text
        assert max(size for size, _ in adapter.batches) > 1


def test_one_at_a_time_when_max_batch_size_is_1() -> None:
    with echo_server(step_s=0.001, max_batch_size=1) as (url, adapter):
        responses = asyncio.run(post_many(url, [chat_body(f"q{i}") for i in range(6)]))
        assert all(r.status_code == 200 for r in responses)
        assert [size for size, _ in adapter.batches] == [1] * 6


# -- the tiny real model ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tiny_vlm_dir: Path) -> ModelAdapter:
    from vlmkit.models.adapters import load_adapter

    return load_adapter(tiny_vlm_dir)


@pytest.fixture(scope="module")
def tiny_server(tiny_adapter: ModelAdapter) -> Iterator[str]:
    settings = ServeSettings(api_key=KEY, max_batch_size=8, batch_wait_ms=20, model_name="tiny")
    with live_server(create_app(tiny_adapter, settings)) as url:
        yield url


def _image_messages(image_path: Any, question: str) -> list[dict[str, Any]]:
    return chat_body(question, image=data_url(Path(image_path).read_bytes()))["messages"]


def test_tiny_model_with_openai_client(
    tiny_server: str, tiny_adapter: ModelAdapter, easyvqa_samples: list[Sample]
) -> None:
    client = openai.OpenAI(base_url=tiny_server + "/v1", api_key=KEY)
    sample = easyvqa_samples[0]
    messages = _image_messages(sample.image, sample.question)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    answer = reply.choices[0].message.content
    assert reply.model == "tiny" and reply.id.startswith("chatcmpl-")
    assert 0 < reply.usage.completion_tokens <= 12
    prompt = Sample(
        id="p", image=Image.open(sample.image), messages=[{"role": "user", "content": sample.question}]
    )
    assert reply.usage.prompt_tokens == int(
        tiny_adapter.encode([prompt], train=False)["attention_mask"].sum()
    )
    assert "encode" not in vars(tiny_adapter)  # the recording shim is gone after each batch
    assert reply.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == answer  # greedy: the stream spells out exactly the plain answer


def test_tiny_model_concurrent_answers_match_one_at_a_time(
    tiny_server: str, easyvqa_samples: list[Sample]
) -> None:
    """Greedy and seeded-sampling answers under concurrency equal the same requests run alone."""
    requests = [
        {"messages": _image_messages(s.image, s.question), "max_tokens": 8, "model": "tiny"}
        for s in easyvqa_samples[:8]
    ]
    requests += [dict(requests[i], temperature=1.0, seed=100 + i) for i in range(4)]
    headers = {"Authorization": f"Bearer {KEY}"}
    alone = []
    with httpx.Client(base_url=tiny_server, headers=headers, timeout=60) as client:
        for body in requests:
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            alone.append(response.json()["choices"][0]["message"]["content"])
    together = asyncio.run(post_many(tiny_server, requests, headers=headers))
    assert [r.json()["choices"][0]["message"]["content"] for r in together] == alone
    assert len(set(alone)) > 1
    health = httpx.get(tiny_server + "/health").json()["batching"]
    assert health["largest_batch"] > 1


def test_serve_builds_the_app_from_a_model_folder(
    tiny_vlm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlmkit.serve.server as server_module
    from vlmkit.errors import ConfigError
    from vlmkit.serve import API_KEY_ENV, serve

    calls: list[dict[str, Any]] = []

    class Recorded:
        def run(self) -> None:
            pass

    def make_server(app: Any, settings: Any, **kwargs: Any) -> Recorded:
        calls.append({"app": app, **kwargs})
        return Recorded()

    monkeypatch.setattr(server_module, "make_server", make_server)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    serve(str(tiny_vlm_dir), port=1234, max_batch_size=3)
    settings = calls[0]["app"].state.settings
    assert (calls[0]["host"], calls[0]["port"]) == ("127.0.0.1", 1234)
    assert settings.key() == "from-env" and settings.max_batch_size == 3
    assert settings.model_name == tiny_vlm_dir.name
    serve(str(tiny_vlm_dir), api_key="explicit")
    assert calls[1]["app"].state.settings.key() == "explicit"
    engine = calls[0]["app"].state.batcher.engine
    assert engine.process.is_alive()  # serve's default: the model in a process of its own
    for call in calls:
        call["app"].state.batcher.engine.close()
    assert not engine.process.is_alive()
    serve(str(tiny_vlm_dir), model_process=False)
    assert not hasattr(calls[2]["app"].state.batcher.engine, "process")
    with pytest.raises(ConfigError, match="max_batch_size"):
        serve(str(tiny_vlm_dir), max_batch_size=0)
    with pytest.raises(ConfigError, match="no_such_limit"):
        serve(str(tiny_vlm_dir), no_such_limit=1)
