"""Load benchmark of `vlmkit serve`: dynamic batching vs one request at a time, same model, same run.

    python benchmarks/serve_load.py                      # 64 clients, 60 s per mode, tiny random VLM
    python benchmarks/serve_load.py --seconds 10         # quicker
    python benchmarks/serve_load.py --model OUT_DIR      # any model folder vlmkit can load

The model decodes greedily, so each question has one right answer. Every expected answer is first
computed offline, one request at a time, straight through the adapter; under load every response
is compared with its own question's expected answer. A response equal to *another* question's
answer is counted as cross-talk, one with no response at all as lost. Each mode runs the server
in its own process on 127.0.0.1 (`serve()` exactly as the CLI runs it); the clients are asyncio
tasks in this process, each sending its next request as soon as the previous one is answered.

Mixed load (`--modes normal,mixed`, written to serve_load_mixed.json by default): the same batched
server and normal clients, alone and then alongside `--bad-clients` attackers that loop over
over-long prompts (~1M characters), image bombs (a 13000x13000 PNG inside a 16x16 ICO, a
20000x20000 1-bit PNG) and abandoned clients (a 200-token request whose socket closes after 50 ms).
Only the normal requests' latencies are reported; the goal is normal p99 under bad traffic within
1.5x of the normal p99 alone, with nothing lost or cross-answered.

Writes benchmarks/results/serve_load.json. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = {
    "vision": {
        "config": {
            "model_type": "resnet",
            "embedding_size": 16,
            "hidden_sizes": [16, 32],
            "depths": [1, 1],
            "layer_type": "basic",
        }
    },
    "language_model": {
        "config": {
            "model_type": "qwen2",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
        }
    },
    "image_size": 32,
    "projector": "mlp",
}


@dataclass
class Question:
    image_url: str
    text: str
    expected: str


@dataclass
class ModeResult:
    mode: str
    max_batch_size: int
    seconds: float
    sent: int = 0
    correct: int = 0
    wrong: int = 0
    cross_talk: int = 0
    http_errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_reasons: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list, repr=False)
    server_batching: dict[str, Any] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    bad_traffic: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        out = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        out.update(
            requests_per_s=round(self.correct / self.seconds, 2),
            p50_latency_s=round(_percentile(lat, 50), 4),
            p99_latency_s=round(_percentile(lat, 99), 4),
            max_latency_s=round(lat[-1], 4) if lat else None,
            all_answered_correctly=self.sent == self.correct,
        )
        return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# -- setup --------------------------------------------------------------------------------------------
def build_tiny_model(out_dir: Path) -> Path:
    """A random tiny VLM (the test suite's spec) with a tokenizer trained on easy-VQA text."""
    import torch

    from vlmkit.data.sources import load_samples
    from vlmkit.models.build import VLMSpec, build_vlm

    samples = load_samples({"source": "easyvqa", "split": "train", "limit": 256})
    torch.manual_seed(0)
    adapter = build_vlm(
        VLMSpec.model_validate(TINY_SPEC), [m["content"] for s in samples for m in s.messages]
    )
    adapter.save(out_dir)
    return out_dir


def make_questions(model_dir: Path, count: int, max_tokens: int) -> list[Question]:
    """Distinct (image, question) pairs with their answers computed one at a time, offline."""
    import torch

    from vlmkit.data.sample import Sample
    from vlmkit.data.sources import load_samples
    from vlmkit.models.adapters import load_adapter
    from vlmkit.serve.images import decode_image
    from vlmkit.serve.settings import ServeSettings

    adapter = load_adapter(model_dir)
    adapter.model.eval()
    settings = ServeSettings()
    questions = []
    with torch.inference_mode():
        for i, sample in enumerate(load_samples({"source": "easyvqa", "split": "test", "limit": count})):
            data = Path(sample.image).read_bytes()
            image = decode_image(data, settings)  # the server's own decoding path
            prompt = Sample(id=str(i), image=image, messages=[{"role": "user", "content": sample.question}])
            expected = adapter.generate([prompt], max_new_tokens=max_tokens)[0]
            url = "data:image/png;base64," + base64.b64encode(data).decode()
            questions.append(Question(url, sample.question, expected))
    return questions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path, port: int, max_batch_size: int, args: argparse.Namespace
) -> subprocess.Popen:
    limits = {
        "max_batch_size": max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "max_queue": max(256, 2 * args.clients),
        "request_timeout_s": 600.0,
        "default_max_tokens": args.max_tokens,
        "model_process": args.engine == "process",
    }
    code = (
        "import sys, torch\n"
        f"sys.setswitchinterval({args.switch_interval!r})\n"
        f"if {args.torch_threads!r}: torch.set_num_threads({args.torch_threads!r})\n"
        "from vlmkit.serve import serve\n"
        f"serve({str(model_dir)!r}, port={port}, log_level='warning', **{limits!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if args.torch_threads:  # the model process is spawned: it reads the thread count from here
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


# -- load ---------------------------------------------------------------------------------------------
def request_body(question: Question, max_tokens: int) -> dict[str, Any]:
    content = [
        {"type": "image_url", "image_url": {"url": question.image_url}},
        {"type": "text", "text": question.text},
    ]
    return {"model": "bench", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection for the load clients.

    httpx costs several ms of CPU per request, and on a small machine the load generator shares
    the CPU with the server; this client costs tens of microseconds, so the figures measure the server.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.reader is not None and self.reader.at_eof():
            await self.close()  # the server closed it while idle (keep-alive timeout)
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def run_load(
    port: int,
    questions: list[Question],
    result: ModeResult,
    clients: int,
    max_tokens: int,
    bad_clients: int = 0,
    bad_kinds: list[str] | None = None,
) -> None:
    """`clients` closed-loop clients, each on its own keep-alive connection, for `result.seconds`
    (alongside `bad_clients` attackers from the end of the warm-up on)."""
    answers_of_others = {q.expected for q in questions}
    bodies = [json.dumps(request_body(q, max_tokens)).encode() for q in questions]
    counter = iter(range(10**12))
    connections = [Connection("127.0.0.1", port) for _ in range(clients)]

    async def one(connection: Connection, index: int, record: bool) -> None:
        question = questions[index % len(questions)]
        started = time.perf_counter()
        try:
            status, payload = await connection.post("/v1/chat/completions", bodies[index % len(questions)])
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            await connection.close()
            if record:
                result.lost += 1
                result.lost_reasons[type(exc).__name__] = result.lost_reasons.get(type(exc).__name__, 0) + 1
            return
        if not record:
            return
        result.latencies_s.append(time.perf_counter() - started)
        if status != 200:
            result.http_errors[str(status)] = result.http_errors.get(str(status), 0) + 1
            return
        answer = json.loads(payload)["choices"][0]["message"]["content"]
        if answer == question.expected:
            result.correct += 1
        else:
            result.wrong += 1
            result.cross_talk += answer in answers_of_others

    # warm-up, not measured
    await asyncio.gather(*(one(c, i, record=False) for i, c in enumerate(connections)))
    deadline = time.perf_counter() + result.seconds
    began = time.perf_counter()

    async def client_loop(connection: Connection) -> None:
        while time.perf_counter() < deadline:
            result.sent += 1
            await one(connection, next(counter), record=True)

    stop = asyncio.Event()
    attack = (
        asyncio.create_task(bad_traffic(port, questions[0], bad_clients, stop, bad_kinds))
        if bad_clients
        else None
    )
    await asyncio.gather(*(client_loop(c) for c in connections))
    result.seconds = time.perf_counter() - began  # includes draining the last in-flight requests
    stop.set()
    if attack is not None:
        result.bad_traffic = await attack
    for connection in connections:
        await connection.close()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height: tens of KB on the wire, gigabytes once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_bodies(question: Question) -> dict[str, bytes]:
    """One request body per kind of bad traffic."""
    png = bomb_png(13000, 13000)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
    ico_url = "data:image/x-icon;base64," + base64.b64encode(ico).decode()
    bomb_url = "data:image/png;base64," + base64.b64encode(bomb_png(20000, 20000)).decode()
    long_text = Question(question.image_url, "what " * 200_000, "")
    abandoned = request_body(Question(question.image_url, question.text * 4, ""), 200)
    return {
        "over_long_prompt": json.dumps(request_body(long_text, 16)).encode(),
        "ico_bomb": json.dumps(request_body(Question(ico_url, question.text, ""), 16)).encode(),
        "pixel_bomb": json.dumps(request_body(Question(bomb_url, question.text, ""), 16)).encode(),
        "abandoned": json.dumps(abandoned).encode(),
    }


async def bad_traffic(
    port: int, question: Question, clients: int, stop: asyncio.Event, kinds: list[str] | None = None
) -> dict[str, Any]:
    """`clients` attackers cycling through the bad kinds until `stop`; returns what each kind got."""
    bodies = bad_bodies(question)
    if kinds:
        bodies = {kind: bodies[kind] for kind in kinds}
    outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in bodies}

    async def abandon(body: bytes) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def attacker(offset: int) -> None:
        connection = Connection("127.0.0.1", port)
        kinds = list(bodies)
        i = offset
        while not stop.is_set():
            kind = kinds[i % len(kinds)]
            i += 1
            try:
                if kind == "abandoned":
                    await abandon(bodies[kind])
                    outcomes[kind]["sent"] += 1
                else:
                    status, _ = await connection.post("/v1/chat/completions", bodies[kind])
                    outcomes[kind][str(status)] += 1
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                outcomes[kind][type(exc).__name__] += 1
                await connection.close()
        await connection.close()

    await asyncio.gather(*(attacker(k) for k in range(clients)))
    return {kind: dict(counter) for kind, counter in outcomes.items()}


def run_mode(mode: str, model_dir: Path, questions: list[Question], args: argparse.Namespace) -> ModeResult:
    max_batch_size = 1 if mode == "single" else args.max_batch_size
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(model_dir, port, max_batch_size, args)
    print(f"  server pid {process.pid} on {url}", flush=True)
    try:
        wait_healthy(url, process)
        result = ModeResult(mode=mode, max_batch_size=max_batch_size, seconds=args.seconds)
        server_before, client_before = cpu_seconds(process.pid), time.process_time()
        bad = args.bad_clients if mode == "mixed" else 0
        kinds = args.bad_kinds.split(",") if args.bad_kinds else None
        asyncio.run(run_load(port, questions, result, args.clients, args.max_tokens, bad, kinds))
        result.server_batching = httpx.get(url + "/health", timeout=10).json()["batching"]
        result.server_cpu_s = round(cpu_seconds(process.pid) - server_before, 2)
        result.client_cpu_s = round(time.process_time() - client_before, 2)
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children, e.g. the model process (Linux /proc)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def versions() -> dict[str, str]:
    names = ["vlmkit", "torch", "transformers", "fastapi", "uvicorn", "httpx", "pydantic"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny random VLM)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per mode")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--questions", type=int, default=256, help="distinct image+question pairs")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch.set_num_threads in the server (0: torch default)"
    )
    parser.add_argument("--switch-interval", type=float, default=0.005)
    parser.add_argument(
        "--modes", default="batched,single", help="batched, single; normal,mixed for the bad-traffic run"
    )
    parser.add_argument("--bad-clients", type=int, default=4, help="attackers in the mixed mode")
    parser.add_argument(
        "--bad-kinds",
        default="",
        help="comma-separated subset of over_long_prompt,ico_bomb,pixel_bomb,abandoned (default: all)",
    )
    parser.add_argument(
        "--engine",
        choices=["process", "thread"],
        default="process",
        help="model in its own process (serve's default) or in a thread of the server's",
    )
    parser.add_argument("--note", default="", help="free text kept in the JSON (e.g. machine load)")
    parser.add_argument(
        "--out", type=Path, help="default results/serve_load.json (mixed: serve_load_mixed.json)"
    )
    args = parser.parse_args()
    if args.out is None:
        name = "serve_load_mixed.json" if "mixed" in args.modes else "serve_load.json"
        args.out = ROOT / "benchmarks" / "results" / name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "tiny_vlm")
        questions = make_questions(model_dir, args.questions, args.max_tokens)
        distinct = len({q.expected for q in questions})
        counts = Counter(q.expected for q in questions)
        # chance that two random questions share an answer, i.e. that a swapped answer would go unnoticed
        collision = sum((n / len(questions)) ** 2 for n in counts.values())
        print(f"{len(questions)} questions, {distinct} distinct expected answers", flush=True)
        results = {}
        for mode in args.modes.split(","):
            print(f"running {mode} for {args.seconds:.0f} s with {args.clients} clients ...", flush=True)
            results[mode] = run_mode(mode, model_dir, questions, args).summary()
            summary = results[mode]
            print(
                f"  {mode}: {summary['requests_per_s']} req/s, p50 {summary['p50_latency_s']} s, "
                f"p99 {summary['p99_latency_s']} s, sent {summary['sent']}, correct {summary['correct']}, "
                f"wrong {summary['wrong']}, lost {summary['lost']}, errors {summary['http_errors']}, "
                f"mean batch {summary['server_batching'].get('mean_batch')}, server cpu {summary['server_cpu_s']} s, "
                f"client cpu {summary['client_cpu_s']} s",
                flush=True,
            )

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "note": args.note,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            # other users' work on the machine shows up here; the figures are only as quiet as the box
            "load_average_1_5_15min_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15min_after": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": versions(),
        "setup": {
            "model": str(args.model) if args.model else "tiny random VLM (ResNet + 2-layer Qwen2, hidden 32)",
            "decoding": "greedy",
            "clients": args.clients,
            "seconds_per_mode": args.seconds,
            "max_tokens": args.max_tokens,
            "questions": len(questions),
            "distinct_expected_answers": distinct,
            "chance_a_swapped_answer_goes_unnoticed": round(collision, 4),
            "batch_wait_ms": args.batch_wait_ms,
            "torch_threads": args.torch_threads or "torch default",
            "bad_clients_in_mixed_mode": args.bad_clients,
            "bad_kinds": args.bad_kinds or "all",
            "engine": args.engine,
        },
        "results": results,
    }
    if {"batched", "single"} <= results.keys():
        batched, single = results["batched"], results["single"]
        ratio = (
            batched["requests_per_s"] / single["requests_per_s"] if single["requests_per_s"] else float("inf")
        )
        p99_ok = batched["p99_latency_s"] <= single["p99_latency_s"]
        report["comparison"] = {
            "throughput_ratio_batched_over_single": round(ratio, 2),
            "batched_p99_within_single_p99": p99_ok,
            "goal_3x_at_same_p99_bound_met": ratio >= 3 and p99_ok,
            "no_request_lost_or_misrouted": all(
                r["all_answered_correctly"] and r["lost"] == 0 for r in results.values()
            ),
        }
        print(json.dumps(report["comparison"], indent=2))
    if {"normal", "mixed"} <= results.keys():
        normal, mixed = results["normal"], results["mixed"]
        ratio = mixed["p99_latency_s"] / normal["p99_latency_s"] if normal["p99_latency_s"] else float("inf")
        report["comparison_bad_traffic"] = {
            "normal_p50_s_alone_vs_under_bad_traffic": [normal["p50_latency_s"], mixed["p50_latency_s"]],
            "normal_p99_s_alone_vs_under_bad_traffic": [normal["p99_latency_s"], mixed["p99_latency_s"]],
            "p99_ratio_under_bad_traffic": round(ratio, 2),
            "goal_p99_ratio_at_most_1_5_met": ratio <= 1.5,
            "no_normal_request_lost_or_misrouted": all(
                r["all_answered_correctly"] and r["lost"] == 0 and r["cross_talk"] == 0
                for r in (normal, mixed)
            ),
            "bad_traffic_outcomes": mixed["bad_traffic"],
        }
        print(json.dumps(report["comparison_bad_traffic"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
