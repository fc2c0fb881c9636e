"""Serving under hostile or demanding use: prompt length, image formats, abandoned work, slow
connections, browser safety, OpenAI/vLLM options, shutdown, limits on the command line.

Live uvicorn servers on 127.0.0.1: `EchoAdapter` (deterministic, every answer derived from its
question) for routing and timing, the tiny random VLM with the official `openai` client for the
sampling options.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import socket
import struct
import threading
import time
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

from test_serve import (  # noqa: E402
    KEY,
    EchoAdapter,
    assert_error_shape,
    bomb_png,
    chat_body,
    data_url,
    echo_answer,
    live_server,
    png_bytes,
    post_many,
)
from vlmkit.data.sample import Sample  # noqa: E402
from vlmkit.models.adapters.base import ModelAdapter  # noqa: E402
from vlmkit.serve import ServeSettings  # noqa: E402
from vlmkit.serve.app import create_app  # noqa: E402
from vlmkit.serve.errors import APIError  # noqa: E402
from vlmkit.serve.images import decode_image  # noqa: E402
from vlmkit.serve.server import make_server  # noqa: E402
from vlmkit.serve.streaming import OpenAIPenalties, RowsCancelled  # noqa: E402

CHAT = "/v1/chat/completions"


class StepCountingEcho(EchoAdapter):
    """EchoAdapter that counts the generation steps it ran (to see abandoned work stop)."""

    def __init__(self, step_s: float = 0.0) -> None:
        super().__init__(step_s)
        self.steps = 0

    def generate(self, samples: Sequence[Sample], *, streamer: Any = None, **kwargs: Any) -> list[str]:
        if streamer is not None:
            original = streamer.put

            def put(value: torch.Tensor) -> None:
                self.steps += 1
                original(value)

            streamer.put = put
        return super().generate(samples, streamer=streamer, **kwargs)


class FailingEcho(EchoAdapter):
    """Raises an allocator-like error (with an address) for any batch holding a BOOM question."""

    def generate(self, samples: Sequence[Sample], **kwargs: Any) -> list[str]:
        if any("BOOM" in s.prompt_messages()[-1]["content"] for s in samples):
            raise RuntimeError("CUDA out of memory. Tried to allocate 9.3 GiB at 0x7f3a2c000000")
        return super().generate(samples, **kwargs)


@contextlib.contextmanager
def echo(adapter: EchoAdapter | None = None, **settings: Any) -> Iterator[tuple[str, EchoAdapter]]:
    adapter = adapter or StepCountingEcho()
    with live_server(create_app(adapter, ServeSettings(**settings))) as url:
        yield url, adapter


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_request(body: dict[str, Any], port: int) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


# -- 1. prompt length ---------------------------------------------------------------------------------------
def test_over_long_prompts_are_refused_at_admission_without_delaying_others() -> None:
    adapter = StepCountingEcho(step_s=0.002)
    with echo(adapter, max_context_tokens=200, max_batch_size=8, batch_wait_ms=30) as (url, _):
        huge = chat_body("word " * 300_000)  # 1.5M characters: refused from its length, untokenized
        started = time.monotonic()
        assert_error_shape(httpx.post(url + CHAT, json=huge), 400, "context_length_exceeded")
        assert time.monotonic() - started < 2.0
        error = assert_error_shape(httpx.post(url + CHAT, json=chat_body("x" * 250)), 400)
        assert error["code"] == "context_length_exceeded" and "200 tokens" in error["message"]
        # prompt + explicit max_tokens over the context: refused; omitted: shortened to what fits
        asked = chat_body("y" * 150, max_tokens=100)
        assert_error_shape(httpx.post(url + CHAT, json=asked), 400, "context_length_exceeded")
        fitted = httpx.post(url + CHAT, json=chat_body("z" * 190))
        assert fitted.status_code == 200 and fitted.json()["usage"]["completion_tokens"] == 10
        assert fitted.json()["choices"][0]["finish_reason"] == "length"
        # the long ones fail alone and fast, the normal ones in the same burst are answered correctly
        bodies = [chat_body(f"normal {i}") if i % 2 else huge for i in range(8)]
        responses = asyncio.run(post_many(url, bodies))
        for i, response in enumerate(responses):
            if i % 2:
                assert response.json()["choices"][0]["message"]["content"] == echo_answer(f"normal {i}")
            else:
                assert_error_shape(response, 400, "context_length_exceeded")
        assert all(size <= 4 for size, _ in adapter.batches)  # no over-long prompt was ever queued


def test_prompt_count_at_admission_matches_the_adapters_encoding(
    tiny_adapter: ModelAdapter, easyvqa_samples: list[Sample]
) -> None:
    from vlmkit.serve.prompt_length import PromptCounter, model_context

    counter = PromptCounter(tiny_adapter)
    assert counter.limits.context == model_context(tiny_adapter) > 0
    for sample in easyvqa_samples[:6]:
        image = Image.open(sample.image)
        prompt = Sample(id="p", image=image, messages=sample.prompt_messages())
        real = int(tiny_adapter.encode([prompt], train=False)["attention_mask"].sum())
        assert counter.count(prompt.messages, [image.size]) == real
        text_only = Sample(id="t", image=None, messages=sample.prompt_messages())
        real = int(tiny_adapter.encode([text_only], train=False)["attention_mask"].sum())
        assert counter.count(text_only.messages, []) == real


# -- 2. images ----------------------------------------------------------------------------------------------
def ico_holding(png: bytes, declared: int = 16) -> bytes:
    """An ICO whose directory declares a `declared`-pixel icon but whose data is `png`."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def frames_image(format: str, frames: int) -> bytes:
    images = [Image.new("RGB", (8, 8), (i * 7 % 256, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=format, save_all=True, append_images=images[1:], duration=10)
    return buffer.getvalue()


def test_image_formats_and_frames_are_checked_before_decoding() -> None:
    settings = ServeSettings(max_image_frames=4)
    ico = ico_holding(bomb_png(13000, 13000))  # opening it unguarded decodes 169 MP (~0.5 s)
    decode_image(png_bytes(), settings)  # Pillow's plugins are loaded
    gc.collect()  # a collection of the earlier tests' garbage is not what this times
    started = time.monotonic()
    with pytest.raises(APIError) as refused:
        decode_image(ico, settings)
    assert refused.value.code == "invalid_image" and time.monotonic() - started < 0.2
    assert "0x" not in refused.value.message and "BytesIO" not in refused.value.message
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    with pytest.raises(APIError):
        decode_image(tiff.getvalue(), settings)
    for format in ("GIF", "PNG", "WEBP"):
        assert decode_image(frames_image(format, 3), settings).size == (8, 8)  # first frame only
        with pytest.raises(APIError) as many:
            decode_image(frames_image(format, 9), settings)
        assert many.value.code == "image_too_many_frames", format
    assert decode_image(png_bytes(), settings).mode == "RGB"


def test_images_are_decoded_in_the_worker_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmkit.serve.images as images

    threads: list[str] = []
    original = images.decode_image

    def recording(data: bytes, settings: ServeSettings) -> Image.Image:
        threads.append(threading.current_thread().name)
        return original(data, settings)

    monkeypatch.setattr(images, "decode_image", recording)
    with echo() as (url, _):
        responses = asyncio.run(post_many(url, [chat_body(f"q{i}") for i in range(4)]))
        assert all(r.status_code == 200 for r in responses)
    assert len(threads) == 4 and all(name.startswith("vlmkit-decode") for name in threads), threads


def test_queued_image_bytes_are_bounded() -> None:
    big = data_url(png_bytes((512, 512)))  # 786 KB decoded
    with echo(StepCountingEcho(step_s=0.05), max_batch_size=1, max_queued_image_bytes=2**20) as (url, _):

        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.create_task(client.post(CHAT, json=chat_body("first", image=big)))
                await asyncio.sleep(0.3)  # running: the queue is empty again
                second = asyncio.create_task(client.post(CHAT, json=chat_body("second", image=big)))
                await asyncio.sleep(0.3)  # waiting, holding its image
                third = await client.post(CHAT, json=chat_body("third", image=big))
                small = await client.post(CHAT, json=chat_body("small", max_tokens=2))
                return [await first, await second, third, small]

        first, second, third, small = asyncio.run(go())
        assert first.status_code == second.status_code == 200
        error = assert_error_shape(third, 429, "queue_full")
        assert "max_queued_image_bytes" in error["message"]
        assert small.status_code == 200


# -- 3. work nobody waits for, slow connections -----------------------------------------------------------------
def test_requests_of_clients_that_left_are_cancelled() -> None:
    adapter = StepCountingEcho(step_s=0.02)
    with echo(adapter, max_batch_size=1) as (url, _):
        long = chat_body("tell me a long story " * 3, max_tokens=200)  # ~80 steps, ~1.6 s
        sockets = []
        for _ in range(4):  # one starts generating, three wait in the queue; all leave
            sock = socket.create_connection(("127.0.0.1", port_of(url)))
            sock.sendall(raw_request(long, port_of(url)))
            sockets.append(sock)
        time.sleep(0.3)
        for sock in sockets:
            sock.close()
        started = time.monotonic()
        reply = httpx.post(url + CHAT, json=chat_body("next", max_tokens=4), timeout=30)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "you"
        assert time.monotonic() - started < 1.0  # not behind 4 x 1.6 s of abandoned work
        assert len(adapter.batches) == 2 and adapter.steps < 40  # the running one stopped early


def test_rows_of_cancelled_requests_stop() -> None:
    flags = [False, True]
    criteria = RowsCancelled(lambda: flags)
    assert criteria(torch.zeros((2, 3), dtype=torch.long), torch.zeros((2, 5))).tolist() == [False, True]


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    sock.settimeout(limit_s)
    started = time.monotonic()
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data, time.monotonic() - started


def test_idle_slow_header_and_slow_body_connections_are_closed() -> None:
    with echo(header_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=0.5) as (url, _):
        port = port_of(url)
        idle = socket.create_connection(("127.0.0.1", port))
        data, waited = read_until_closed(idle, 5)
        assert data == b"" and waited < 3

        slow = socket.create_connection(("127.0.0.1", port))
        head = raw_request(chat_body("q"), port)
        for byte in head[:20]:  # one header byte per 0.1 s: the headers never complete in time
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        data, waited = read_until_closed(slow, 5)
        assert data == b"" and waited < 3

        trickle = socket.create_connection(("127.0.0.1", port))
        request = raw_request(chat_body("q"), port)
        split = request.index(b"\r\n\r\n") + 4
        trickle.sendall(request[:split])
        for byte in request[split : split + 8]:
            with contextlib.suppress(OSError):
                trickle.sendall(bytes([byte]))
            time.sleep(0.1)
        data, _ = read_until_closed(trickle, 5)
        assert data.startswith(b"HTTP/1.1 408") and b"body_timeout" in data


# -- 4. browsers ---------------------------------------------------------------------------------------------------
def test_browser_guards_content_type_host_and_cors() -> None:
    with echo() as (url, _):
        body = json.dumps(chat_body("q"))
        plain = httpx.post(url + CHAT, content=body, headers={"Content-Type": "text/plain"})
        assert_error_shape(plain, 415, "unsupported_media_type")
        form = httpx.post(
            url + CHAT, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert_error_shape(form, 415)
        rebound = httpx.post(
            url + CHAT, json=chat_body("q"), headers={"Host": f"evil.example:{port_of(url)}"}
        )
        assert_error_shape(rebound, 400, "host_not_allowed")
        assert_error_shape(httpx.get(url + "/health", headers={"Host": "evil.example"}), 400)
        local = httpx.post(url + CHAT, json=chat_body("q"), headers={"Host": f"localhost:{port_of(url)}"})
        assert local.status_code == 200
        preflight = httpx.options(
            url + CHAT,
            headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        ok = httpx.post(url + CHAT, json=chat_body("q"), headers={"Origin": "http://page.example"})
        assert "access-control-allow-origin" not in ok.headers
    with echo(cors_origins=["http://app.example"], allowed_hosts=["*"]) as (url, _):
        preflight = httpx.options(
            url + CHAT,
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        anywhere = httpx.post(url + CHAT, json=chat_body("q"), headers={"Host": "any.example"})
        assert anywhere.status_code == 200


# -- 5. parameters --------------------------------------------------------------------------------------------------
def test_unimplemented_parameters_are_refused_by_name() -> None:
    with echo() as (url, _):
        refused = {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto",
            "response_format": {"type": "json_object"},
            "logit_bias": {"5": 10},
            "guided_json": {"type": "object"},
            "best_of": 3,
            "no_such_option": 1,
        }
        for name, value in refused.items():
            error = assert_error_shape(httpx.post(url + CHAT, json=chat_body("q", **{name: value})), 400)
            assert error["param"] == name and name in error["message"], error
        for name, value in {"presence_penalty": 5, "frequency_penalty": -3, "top_logprobs": 99}.items():
            options = {name: value, "logprobs": True}
            assert_error_shape(httpx.post(url + CHAT, json=chat_body("q", **options)), 400)
        no_ops = {"response_format": {"type": "text"}, "tools": None, "user": "u1", "logit_bias": None}
        accepted = httpx.post(url + CHAT, json=chat_body("q", **no_ops))
        assert accepted.status_code == 200, accepted.text
        with pytest.raises(openai.BadRequestError, match="tools"):
            openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(
                model="m",
                messages=chat_body("q")["messages"],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            )


def test_openai_penalties_processor() -> None:
    processor = OpenAIPenalties(presence=0.5, frequency=1.0)
    scores = torch.zeros((2, 6))
    assert torch.equal(processor(torch.tensor([[4, 5], [5, 5]]), scores), scores)  # prompt only
    step = processor(torch.tensor([[4, 5, 1, 1], [5, 5, 2, 3]]), torch.zeros((2, 6)))
    assert step[0].tolist() == [0, -2.5, 0, 0, 0, 0]  # token 1 twice: 0.5 + 2 * 1.0
    assert step[1].tolist() == [0, 0, -1.5, -1.5, 0, 0]  # the prompt's 5s are not penalised


@pytest.fixture(scope="module")
def tiny_adapter(tiny_vlm_dir: Path) -> ModelAdapter:
    from vlmkit.models.adapters import load_adapter

    return load_adapter(tiny_vlm_dir)


@pytest.fixture(scope="module")
def tiny_url(tiny_adapter: ModelAdapter) -> Iterator[str]:
    settings = ServeSettings(max_batch_size=8, batch_wait_ms=20, model_name="tiny")
    with live_server(create_app(tiny_adapter, settings)) as url:
        yield url


def test_sampling_options_on_the_tiny_model(tiny_url: str, easyvqa_samples: list[Sample]) -> None:
    client = openai.OpenAI(base_url=tiny_url + "/v1", api_key="x")
    sample = easyvqa_samples[0]
    messages = chat_body(sample.question, image=data_url(Path(sample.image).read_bytes()))["messages"]

    def ask(**options: Any) -> Any:
        return client.chat.completions.create(model="tiny", messages=messages, **options)

    plain = ask(max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = plain.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    for token in content:  # greedy: each chosen token is its step's likeliest
        assert token.logprob <= 0 and token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert [t.logprob for t in token.top_logprobs] == sorted(
            (t.logprob for t in token.top_logprobs), reverse=True
        )
    assert "".join(t.token for t in content).strip() == plain.choices[0].message.content

    sampled = ask(max_tokens=8, n=3, temperature=1.5, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) > 1
    assert (
        ask(max_tokens=8, n=3, temperature=1.5, seed=7).choices[2].message.content
        == sampled.choices[2].message.content
    )
    greedy = ask(max_tokens=8, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 2 * ask(max_tokens=8).usage.completion_tokens

    forced = ask(max_tokens=10, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 10 and forced.choices[0].finish_reason == "length"
    at_least = ask(max_tokens=10, extra_body={"min_tokens": 6})
    assert at_least.usage.completion_tokens >= 6
    base = ask(max_tokens=16).choices[0].message.content
    penalised = [
        ask(max_tokens=16, frequency_penalty=2.0).choices[0].message.content,
        ask(max_tokens=16, presence_penalty=2.0).choices[0].message.content,
        ask(max_tokens=16, extra_body={"repetition_penalty": 3.0}).choices[0].message.content,
    ]
    assert any(text != base for text in penalised), (base, penalised)

    stream = ask(max_tokens=8, n=2, temperature=1.5, seed=7, stream=True, logprobs=True)
    texts = {0: "", 1: ""}
    logprob_tokens = 0
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            logprob_tokens += (
                len(choice.logprobs.content) if choice.logprobs and choice.logprobs.content else 0
            )
    unstreamed = ask(max_tokens=8, n=2, temperature=1.5, seed=7)
    assert [texts[0], texts[1]] == [c.message.content for c in unstreamed.choices]
    assert logprob_tokens > 0


# -- 6. shutdown, seeds, internals ------------------------------------------------------------------------------------------
def test_graceful_shutdown_finishes_short_work_and_ends_the_rest_with_503() -> None:
    adapter = StepCountingEcho(step_s=0.05)
    settings = ServeSettings(shutdown_grace_s=1.0, max_batch_size=4, batch_wait_ms=20)
    app = create_app(adapter, settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def go() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            long = chat_body("a long question " * 4, max_tokens=300)  # ~4 s
            short = asyncio.create_task(client.post(CHAT, json=chat_body("short", max_tokens=10)))  # 0.5 s
            await asyncio.sleep(0.1)
            tasks = [
                asyncio.create_task(client.post(CHAT, json=long)),
                asyncio.create_task(client.post(CHAT, json=dict(long, stream=True))),
            ]
            await asyncio.sleep(0.2)
            server.should_exit = True
            return await asyncio.gather(*tasks, short)

    plain, stream, short = asyncio.run(go())
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert short.status_code == 200 and short.json()["choices"][0]["message"]["content"] == "you asked:"
    assert_error_shape(plain, 503, "shutting_down")
    events = [line for line in stream.text.split("\n\n") if line.startswith("data: ")]
    assert '"code":"shutting_down"' in events[-2] and events[-1] == "data: [DONE]"


def test_failures_are_logged_not_returned_and_batch_mates_survive(caplog: pytest.LogCaptureFixture) -> None:
    with echo(FailingEcho(), max_batch_size=8, batch_wait_ms=50) as (url, _):
        bodies = [chat_body("BOOM" if i == 2 else f"q{i}") for i in range(5)]
        responses = asyncio.run(post_many(url, bodies))
        for i, response in enumerate(responses):
            if i == 2:
                error = assert_error_shape(response, 500, "generation_failed")
                assert "0x" not in error["message"] and "memory" not in error["message"]
            else:
                assert response.json()["choices"][0]["message"]["content"] == echo_answer(f"q{i}")
        assert "0x7f3a2c000000" in caplog.text  # the operator still sees what happened
        assert_error_shape(httpx.post(url + CHAT, json=chat_body("q", seed=2**63)), 400)
        assert httpx.post(url + CHAT, json=chat_body("q", seed=2**63 - 1)).status_code == 200


# -- 7. keys on the schema, CLI flags, config file ------------------------------------------------------------------------------
def test_openapi_needs_the_key_and_docs_are_off() -> None:
    with echo(api_key=KEY) as (url, _):
        assert_error_shape(httpx.get(url + "/openapi.json"), 401)
        spec = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert spec.status_code == 200 and CHAT in spec.json()["paths"]
        assert httpx.get(url + "/docs").status_code == 404


def test_cli_flags_and_config_file_reach_the_settings(
    tmp_path: Path, tiny_vlm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import vlmkit.serve.server as server_module
    from vlmkit.cli import app

    seen: list[Any] = []

    class Recorded:
        def run(self) -> None:
            pass

    def make(app_: Any, settings: Any, **kwargs: Any) -> Recorded:
        seen.append((settings, kwargs))
        return Recorded()

    monkeypatch.setattr(server_module, "make_server", make)
    config = tmp_path / "serve.yaml"
    config.write_text("max_queue: 7\nmax_batch_size: 3\nallowed_image_hosts: [images.example]\n")
    result = CliRunner().invoke(
        app,
        [
            "serve", "--model", str(tiny_vlm_dir), "--config", str(config), "--max-batch-size", "5",
            "--max-context-tokens", "99", "--allowed-host", "box.lan", "--cors-origin", "http://a.example",
            "--request-timeout-s", "3", "--shutdown-grace-s", "2", "--header-timeout-s", "4",
            "--model-in-thread", "--short-first-batches", "0", "--max-images", "3",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings, kwargs = seen[0]
    assert (settings.max_queue, settings.max_batch_size, settings.max_context_tokens) == (7, 5, 99)
    assert settings.allowed_image_hosts == ["images.example"] and settings.allowed_hosts == ["box.lan"]
    assert settings.cors_origins == ["http://a.example"] and settings.request_timeout_s == 3
    assert settings.shutdown_grace_s == 2 and settings.header_timeout_s == 4
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 8000)
    assert not settings.model_process and settings.short_first_batches == 0 and settings.max_images == 3
    # every setting has its flag
    import inspect

    from vlmkit.cli import serve as serve_command

    flags = set(inspect.signature(serve_command).parameters)
    plural = {"image_formats", "allowed_image_hosts", "allowed_hosts", "cors_origins"}  # repeatable flags
    missing = [
        name for name in ServeSettings.model_fields if (name[:-1] if name in plural else name) not in flags
    ]
    assert not missing, missing
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_queue: 0\n")
    failed = CliRunner().invoke(app, ["serve", "--model", str(tiny_vlm_dir), "--config", str(bad)])
    assert failed.exit_code != 0
