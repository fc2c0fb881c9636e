"""The model in its own process (what `vlmkit serve` runs), and requests with several images or none.

The process engine is tested the way it is used: a spawned child loads the model folder, a live
uvicorn server in front of it, the official `openai` client against that. Its answers must equal
the in-process adapter's, and cancelling, failing and dying must reach the HTTP side.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_serve import (  # noqa: E402
    KEY,
    EchoAdapter,
    assert_error_shape,
    chat_body,
    data_url,
    echo_answer,
    live_server,
    png_bytes,
)
from vlmkit.data.sample import Sample  # noqa: E402
from vlmkit.errors import VlmkitError  # noqa: E402
from vlmkit.models.adapters.base import ModelAdapter  # noqa: E402
from vlmkit.serve import ServeSettings  # noqa: E402
from vlmkit.serve.app import create_app  # noqa: E402
from vlmkit.serve.engine_process import ProcessEngine  # noqa: E402

CHAT = "/v1/chat/completions"
pytest_plugins = ["tiny_families"]


def slow_echo(path: str, device: str | None = None) -> EchoAdapter:
    """Loader for the child: an echo model taking 20 ms per character, so cancelling shows."""
    return EchoAdapter(step_s=0.02)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_vlm_dir: Path) -> ModelAdapter:
    from vlmkit.models.adapters import load_adapter

    return load_adapter(tiny_vlm_dir)


@pytest.fixture(scope="module")
def tiny_engine(tiny_vlm_dir: Path) -> Iterator[ProcessEngine]:
    engine = ProcessEngine.start(str(tiny_vlm_dir), log_level="warning")
    yield engine
    engine.close()


def test_process_engine_answers_as_the_adapter_does(
    tiny_engine: ProcessEngine, tiny_adapter: ModelAdapter, easyvqa_samples: list[Sample]
) -> None:
    settings = ServeSettings(api_key=KEY, max_batch_size=8, batch_wait_ms=20, model_name="tiny")
    from vlmkit.serve.prompt_length import model_context

    assert tiny_engine.limits.context == model_context(tiny_adapter)
    with live_server(create_app(tiny_engine, settings)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        samples = easyvqa_samples[:6]
        expected = tiny_adapter.generate(
            [Sample(id=s.id, image=Image.open(s.image), messages=s.prompt_messages()) for s in samples],
            max_new_tokens=8,
        )
        bodies = [
            {"messages": chat_body(s.question, data_url(Path(s.image).read_bytes()))["messages"]}
            for s in samples
        ]

        async def all_at_once() -> list[Any]:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY) as aclient:
                return await asyncio.gather(
                    *(aclient.chat.completions.create(model="tiny", max_tokens=8, **b) for b in bodies)
                )

        replies = asyncio.run(all_at_once())
        assert [r.choices[0].message.content for r in replies] == expected  # batched in the child
        assert httpx.get(url + "/health").json()["batching"]["largest_batch"] > 1
        prompt = Sample(id="p", image=Image.open(samples[0].image), messages=samples[0].prompt_messages())
        assert replies[0].usage.prompt_tokens == int(
            tiny_adapter.encode([prompt], train=False)["attention_mask"].sum()
        )
        # streams, log-probabilities and sampled choices come back over the pipe
        stream = client.chat.completions.create(model="tiny", max_tokens=8, stream=True, **bodies[0])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected[0]
        scored = client.chat.completions.create(
            model="tiny", max_tokens=4, logprobs=True, top_logprobs=2, **bodies[0]
        )
        tokens = scored.choices[0].logprobs.content
        assert tokens and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
        sampled = client.chat.completions.create(
            model="tiny", max_tokens=4, n=3, temperature=1.0, **bodies[0]
        )
        assert len(sampled.choices) == 3
        # a prompt counted in the child (not refused by its length in characters alone)
        long = "why " * 40_000
        assert len(long) < tiny_engine.limits.context * tiny_engine.limits.chars_per_token
        with pytest.raises(openai.BadRequestError, match="context"):
            client.chat.completions.create(model="tiny", messages=chat_body(long)["messages"], max_tokens=4)


def test_process_engine_cancels_work_whose_client_left() -> None:
    engine = ProcessEngine.start("unused", loader="test_serve_engine:slow_echo", log_level="warning")
    try:
        with live_server(create_app(engine, ServeSettings(batch_wait_ms=0))) as url:
            question = "a question long enough to take a while " * 2  # ~100 characters: ~2 s
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + CHAT, json=chat_body(question, max_tokens=200), timeout=0.3)
            started = time.monotonic()
            reply = httpx.post(url + CHAT, json=chat_body("next", max_tokens=200), timeout=30)
            waited = time.monotonic() - started
            assert reply.json()["choices"][0]["message"]["content"] == echo_answer("next")
            # the abandoned one stopped within a step or two; running on it would cost ~2 s more
            assert waited < 1.5, waited
    finally:
        engine.close()
    assert not engine.process.is_alive()


def test_a_dead_model_process_gives_503_and_health_says_so() -> None:
    engine = ProcessEngine.start("unused", loader="test_serve_engine:slow_echo", log_level="warning")
    try:
        with live_server(create_app(engine, ServeSettings(batch_wait_ms=0))) as url:
            assert httpx.post(url + CHAT, json=chat_body("hi"), timeout=30).status_code == 200

            async def killed_midway() -> httpx.Response:
                async with httpx.AsyncClient(timeout=30) as client:
                    pending = asyncio.ensure_future(client.post(url + CHAT, json=chat_body("x" * 80)))
                    await asyncio.sleep(0.5)
                    engine.process.kill()
                    return await pending

            assert_error_shape(asyncio.run(killed_midway()), 503, "model_unavailable")
            assert_error_shape(httpx.post(url + CHAT, json=chat_body("hi")), 503, "model_unavailable")
            assert httpx.get(url + "/health").status_code == 503
    finally:
        engine.close()


def test_model_process_with_a_loaded_adapter_is_refused_not_ignored() -> None:
    from vlmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="model_process"):
        create_app(EchoAdapter(), ServeSettings(model_process=True))
    create_app(EchoAdapter(), ServeSettings(model_process=False))  # explicit thread: fine


def test_a_folder_the_child_cannot_load_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(VlmkitError) as failed:
        ProcessEngine.start(str(tmp_path / "missing"), log_level="error")
    assert "\n" not in str(failed.value) and "missing" in str(failed.value)


# -- images per request ---------------------------------------------------------------------------------
def test_text_only_and_too_many_images_follow_the_adapter(
    tiny_adapter: ModelAdapter, tiny_vlm_dir: Path
) -> None:
    with live_server(create_app(tiny_adapter, ServeSettings(batch_wait_ms=0))) as url:
        reply = httpx.post(url + CHAT, json=chat_body("hello there", image=None, max_tokens=6))
        text_only = Sample(id="t", image=None, messages=[{"role": "user", "content": "hello there"}])
        assert (
            reply.json()["choices"][0]["message"]["content"]
            == tiny_adapter.generate([text_only], max_new_tokens=6)[0]
        )
        two = chat_body("which is red?")
        two["messages"][0]["content"].append(
            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
        )
        error = assert_error_shape(httpx.post(url + CHAT, json=two), 400, "too_many_images")
        assert "at most 1 image" in error["message"]


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_several_images_in_one_request(family: str, family_dirs: Any) -> None:
    from vlmkit.models.adapters import load_adapter

    adapter = load_adapter(family_dirs(family))
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "blue")

    def url_of(image: Image.Image) -> str:
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return data_url(buffer.getvalue())

    content = [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": url_of(red)}},
        {"type": "text", "text": "then"},
        {"type": "image_url", "image_url": {"url": url_of(blue)}},
        {"type": "text", "text": "same?"},
    ]
    sample = Sample(
        id="two",
        image=[red, blue],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "first"},
                    {"type": "image"},
                    {"type": "text", "text": "then"},
                    {"type": "image"},
                    {"type": "text", "text": "same?"},
                ],
            }
        ],
    )
    expected = adapter.generate([sample], max_new_tokens=5)[0]
    swapped = Sample(id="swapped", image=[blue, red], messages=sample.messages)
    with live_server(create_app(adapter, ServeSettings(batch_wait_ms=0, max_images=2))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], max_tokens=5
        )
        assert reply.choices[0].message.content == expected
        real = int(adapter.encode([sample], train=False)["attention_mask"].sum())
        assert reply.usage.prompt_tokens == real
        # the images reach the model in the order the request put them
        content_swapped = [content[0], content[3], content[2], content[1], content[4]]
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content_swapped}], max_tokens=5
        )
        assert reply.choices[0].message.content == adapter.generate([swapped], max_new_tokens=5)[0]
        three = [*content, {"type": "image_url", "image_url": {"url": url_of(red)}}]
        with pytest.raises(openai.BadRequestError, match="at most 2 images"):
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": three}], max_tokens=5
            )


# -- the batch queue's policy -------------------------------------------------------------------------------
class _Queued:
    def __init__(self, name: str, max_tokens: int) -> None:
        from vlmkit.serve.conversation import GenerationParams

        self.name, self.cancelled = name, False
        self.params = GenerationParams(max_new_tokens=max_tokens)
        self.events: list[tuple[str, Any]] = []

    def notify_from_worker(self, kind: str, payload: Any = None) -> None:
        self.events.append((kind, payload))

    @property
    def key(self) -> tuple[object, ...]:
        return self.params.batch_key(self.name)


def test_short_requests_pass_a_long_one_at_most_short_first_times() -> None:
    from vlmkit.serve.batch_queue import BatchQueue

    def order(short_first: int) -> list[list[str]]:
        queue = BatchQueue(max_batch_size=2, wait_s=0.0, short_first=short_first)
        for job in [_Queued("long", 200), *(_Queued(f"s{i}", 16) for i in range(6))]:
            queue.put(job)
        return [[job.name for job in queue.take() or []] for _ in range(4)]

    assert order(2) == [["s0", "s1"], ["s2", "s3"], ["long"], ["s4", "s5"]]
    assert order(0) == [["long"], ["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]  # strictly oldest first


def test_a_cancelled_long_request_that_waited_never_runs() -> None:
    from vlmkit.serve.batch_queue import BatchQueue

    queue = BatchQueue(max_batch_size=4, wait_s=0.0)
    long, short = _Queued("long", 200), _Queued("short", 16)
    queue.put(long)
    queue.put(short)
    assert [job.name for job in queue.take() or []] == ["short"]
    long.cancelled = True  # its client left while it waited: the engine drops it from the queue
    queue.discard(long)
    queue.put(_Queued("next", 16))
    assert [job.name for job in queue.take() or []] == ["next"]
    assert not queue._passed  # nothing is remembered of jobs that left
    # a batch window whose every job is cancelled while it waits: the queue waits on, unharmed
    slow = BatchQueue(max_batch_size=4, wait_s=0.2)
    gone = _Queued("gone", 16)
    slow.put(gone)
    threading.Timer(0.05, slow.discard, args=(gone,)).start()
    threading.Timer(0.3, slow.put, args=(_Queued("later", 16),)).start()  # after the window
    assert [job.name for job in slow.take() or []] == ["later"]
    queue.close()
    assert queue.take() is None


def test_a_server_that_exits_without_closing_its_engine_does_not_hang(tmp_path: Path) -> None:
    """multiprocessing stops daemonic children at exit with SIGTERM: the child must not ignore it."""
    import os
    import subprocess
    import sys

    script = (
        "from vlmkit.serve.engine_process import ProcessEngine\n"
        "engine = ProcessEngine.start('unused', loader='test_serve_engine:slow_echo', log_level='error')\n"
        "print(engine.process.pid, flush=True)\n"
    )
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    child = int(done.stdout.split()[0])
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()


def test_a_batch_that_raises_fails_alone_and_the_model_thread_lives_on() -> None:
    from vlmkit.serve.batch_queue import BatchQueue, serve_batches

    queue = BatchQueue(max_batch_size=4, wait_s=0.0)
    ran: list[list[str]] = []

    def run(batch: list[Any]) -> None:
        names = [job.name for job in batch]
        ran.append(names)
        if "boom" in names:
            raise RuntimeError("a bug outside run_batch's own handling")

    loop = threading.Thread(target=serve_batches, args=(queue, run), daemon=True)
    loop.start()
    boom, after = _Queued("boom", 16), _Queued("after", 8)
    queue.put(boom)
    deadline = time.monotonic() + 5
    while not boom.events and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.put(after)
    while len(ran) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.close()
    loop.join(5)
    assert ran == [["boom"], ["after"]] and not loop.is_alive()
    kind, error = boom.events[0]
    assert kind == "error" and error.status == 500 and "see the server log" in error.message
