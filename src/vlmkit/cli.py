"""`vlmkit ...` commands. Each parses its arguments and calls one library function."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmkit.errors import VlmkitError

app = typer.Typer(
    name="vlmkit",
    help="Compose, train, evaluate, chat with and serve vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: key.sub=value")]
DataOptions = Annotated[
    list[str] | None,
    typer.Option("--data-option", help="A source option, KEY=VALUE (e.g. image_folder=/data/coco)"),
]


def command_line() -> str:
    return "vlmkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def recipe_path(config: Path) -> Path:
    """A config path, or the name of a recipe shipped with vlmkit (e.g. `demo.yaml`)."""
    if config.exists():
        return config
    shipped = resources.files("vlmkit") / "configs" / config.name
    return Path(str(shipped)) if shipped.is_file() else config


def print_eval_summary(summary: dict) -> None:
    table = Table(title=escape(f"{summary['data']} — {summary['metric']}"))
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column("score", justify="right")
    score = summary.get("score")
    table.add_row("all", str(summary["n"]), "-" if score is None else f"{score:.4f}")
    for name, row in summary.get("by_question_type", {}).items():
        table.add_row(escape(str(name)), str(row["n"]), f"{row['score']:.4f}")
    console.print(table)
    for note in summary.get("notes") or []:
        console.print(f"note: {note}", highlight=False)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config YAML")],
    set_: Overrides = None,
    resume: Annotated[
        bool | None, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint")
    ] = None,
    accept_changes: Annotated[
        bool, typer.Option("--accept-changes", help="Resume even though the config or data changed")
    ] = False,
) -> None:
    """Train (or fine-tune) a model from a run config (a VLM, or a CLIP model with `task: clip`)."""
    from vlmkit.config import load_config
    from vlmkit.train.clip_config import config_task, load_clip_config

    config = recipe_path(config)
    if config_task(config) == "clip":
        clip_config = load_clip_config(config, set_ or [])  # validated before torch is imported
        from vlmkit.train.clip import train_clip

        run_dir = train_clip(clip_config, resume=resume, command=command_line())
        console.print(f"CLIP model written to [bold]{escape(str(run_dir / 'model'))}[/bold]")
        return
    run_config = load_config(config, set_ or [])  # validated before torch is imported
    from vlmkit.train.runner import train as run_training

    result = run_training(run_config, resume=resume, command=command_line(), accept_changes=accept_changes)
    console.print(f"model written to [bold]{escape(str(result.model_dir))}[/bold]")
    if result.eval_summary:
        print_eval_summary(result.eval_summary)


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Option("--model", help="Model folder")],
    data: Annotated[
        str, typer.Option("--data", help="Data source, e.g. easyvqa:test or vqav2:validation")
    ] = "easyvqa:test",
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Local folder/file of the source")
    ] = None,
    data_option: DataOptions = None,
    limit: Annotated[
        int | None, typer.Option(help="Score only the first N samples (N >= 1; omit for all)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default MODEL/../eval-DATA)")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="Metric name (default: the source's own)")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Default: the source's")
    ] = None,
    prompt_suffix: Annotated[
        str | None, typer.Option("--prompt-suffix", help="Default: the source's")
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore earlier predictions in --out")] = False,
    on_bad_sample: Annotated[
        str, typer.Option("--on-bad-sample", help="fail (default) or skip: skip and count bad samples")
    ] = "fail",
    task: Annotated[
        str, typer.Option("--task", help="vqa (generate answers) or zeroshot (CLIP classification)")
    ] = "vqa",
) -> None:
    """Score a model on a dataset: VQA by batched greedy decoding, or CLIP zero-shot classification."""
    if task == "zeroshot":
        from vlmkit.eval.zeroshot import zeroshot_eval

        out = out or model.parent / f"zeroshot-{data.split(':')[0]}"
        summary = zeroshot_eval(
            model, data, out_dir=out, batch_size=batch_size, limit=limit, command=command_line()
        )
        print_eval_summary(summary)
        return
    if task != "vqa":
        from vlmkit.errors import ConfigError

        raise ConfigError(f"unknown --task {task!r}; use vqa or zeroshot")
    from vlmkit.data.sources import data_spec, parse_options
    from vlmkit.eval.options import check_eval_options

    check_eval_options(metric, batch_size, limit, max_new_tokens, on_bad_sample)  # before torch loads
    spec = data_spec(data, path=data_path, options=parse_options(data_option))
    from vlmkit.eval.runner import evaluate
    from vlmkit.models.adapters import load_adapter

    adapter = load_adapter(model)
    out = out or model.parent / f"eval-{data.replace(':', '-')}"
    summary = evaluate(
        adapter,
        spec,
        out,
        metric=metric,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_suffix=prompt_suffix,
        limit=limit,
        resume=not fresh,
        model_name=str(model),
        model_dir=model,
        command=command_line(),
        on_bad_sample=on_bad_sample,  # type: ignore[arg-type]
    )
    print_eval_summary(summary)
    console.print(f"predictions and summary in [bold]{escape(str(out))}[/bold]")


@app.command()
def rescore(
    eval_dir: Annotated[Path, typer.Argument(help="Eval folder written by `vlmkit eval`")],
    metric: Annotated[str, typer.Option("--metric", help="Metric to re-score the stored predictions with")],
) -> None:
    """Re-score an eval folder's predictions with another metric, without generating again."""
    from vlmkit.eval.options import check_eval_options

    check_eval_options(metric)
    from vlmkit.eval.runner import rescore as run_rescore

    summary = run_rescore(eval_dir, metric, command=command_line())
    print_eval_summary(summary)
    console.print(f"summary and report rewritten in [bold]{escape(str(eval_dir))}[/bold]")


@app.command()
def compare(
    eval_a: Annotated[Path, typer.Argument(help="Eval folder A (e.g. the base model)")],
    eval_b: Annotated[Path, typer.Argument(help="Eval folder B (e.g. the fine-tuned model)")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default B/compare-vs-A)")] = None,
) -> None:
    """Compare two evaluations on the same data: paired CI of the difference, flips both ways."""
    from vlmkit.eval.compare import compare_evals

    out = out or eval_b / f"compare-vs-{eval_a.name}"
    result = compare_evals(eval_a, eval_b, out)
    table = Table(title=escape(f"{eval_a} vs {eval_b}"))
    for column in ("", "A", "B", "B - A (95% CI)"):
        table.add_column(column)
    diff = result["difference"]
    table.add_row(
        escape(str(result["metric"])),
        f"{result['a']['score']:.4f}",
        f"{result['b']['score']:.4f}",
        f"{diff['estimate']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]",
    )
    console.print(table)
    console.print(
        f"flips: {result['flips']['wrong_to_right']} wrong->right, {result['flips']['right_to_wrong']} right->wrong"
    )
    console.print(f"report in [bold]{escape(str(out))}[/bold]")


@app.command()
def chat(
    model: Annotated[Path, typer.Option("--model", help="Model folder")],
    image: Annotated[Path, typer.Option("--image", help="Image to ask about")],
    question: Annotated[str | None, typer.Option("--question", "-q", help="Answer once and exit")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
) -> None:
    """Ask questions about an image (a loop, or once with --question)."""
    from vlmkit.data.images import load_image
    from vlmkit.models.adapters import load_adapter
    from vlmkit.serve.chat import answer, chat_loop

    load_image(image)
    adapter = load_adapter(model)
    if question is not None:
        console.print(escape(answer(adapter, image, [], question, max_new_tokens)))
        return
    console.print("Ask about the image; an empty line or 'exit' ends.")
    chat_loop(
        adapter,
        image,
        read=lambda: console.input("[bold]you>[/bold] "),
        write=lambda text: console.print(escape(str(text))),
        max_new_tokens=max_new_tokens,
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder")] = Path("runs/demo"),
    set_: Overrides = None,
) -> None:
    """Train a tiny VLM from scratch on easy-VQA on the CPU, evaluate it, show a few answers."""
    from vlmkit.config import load_config
    from vlmkit.train.runner import train as run_training

    recipe = resources.files("vlmkit") / "configs" / "demo.yaml"
    with resources.as_file(recipe) as path:
        run_config = load_config(path, [f"output_dir={out}", *(set_ or [])])
    result = run_training(run_config, command=command_line())
    predictions = result.run_dir / "eval" / "predictions.jsonl"
    if result.eval_summary:
        print_eval_summary(result.eval_summary)
        show_examples(predictions)
    console.print(f"\nmodel: [bold]{escape(str(result.model_dir))}[/bold]")
    example = demo_example(predictions, result.run_dir)
    image, question = example if example else ("<a 64x64 easy-VQA png>", "what color is the shape?")
    console.print(
        f"try:   vlmkit chat --model {escape(str(result.model_dir))} --image {escape(str(image))}"
        f" -q {escape(json.dumps(question))}",
        soft_wrap=True,
    )


def demo_example(predictions: Path, run_dir: Path) -> tuple[Path, str] | None:
    """A test image copied into the run folder and its question, so the printed chat command runs
    as it stands (the easy-VQA images live deep inside site-packages)."""
    if not predictions.is_file():
        return None
    with predictions.open() as rows:
        first = json.loads(next(rows, "null") or "null")
    if not first or not first.get("image") or not Path(first["image"]).is_file():
        return None
    target = run_dir / "example.png"
    shutil.copyfile(first["image"], target)
    return target, first["question"]


data_app = typer.Typer(help="Data tools.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("to-shards")
def to_shards(
    data: Annotated[str, typer.Option("--data", help="Any source, e.g. easyvqa_captions:train")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for .tar shards")],
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard")] = 1000,
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Local folder/file of the source")
    ] = None,
    data_option: DataOptions = None,
) -> None:
    """Write webdataset tar shards (key.png + key.txt/json) from any Sample source."""
    from vlmkit.data.shards import to_shards as write
    from vlmkit.data.sources import data_spec, parse_options

    paths = write(data_spec(data, path=data_path, options=parse_options(data_option)), out, shard_size)
    console.print(f"wrote {len(paths)} shard(s) to [bold]{escape(str(out))}[/bold]")


def _limit(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, show_default=False)


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", help="Model folder")],
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require this bearer key (or env VLMKIT_API_KEY)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML/JSON file of server settings (flags win)")
    ] = None,
    model_name: Annotated[str | None, _limit("Model id in /v1/models (default: folder name)")] = None,
    max_batch_size: Annotated[int | None, _limit("Most requests per model call (default 16)")] = None,
    batch_wait_ms: Annotated[float | None, _limit("Wait to fill a batch (default 5)")] = None,
    short_first_batches: Annotated[
        int | None, _limit("Batches of shorter requests that may pass a longer one; 0 FIFO (default 2)")
    ] = None,
    max_queue: Annotated[int | None, _limit("Waiting requests before 429 (default 256)")] = None,
    request_timeout_s: Annotated[
        float | None, _limit("Queue + generation budget before 504 (default 120)")
    ] = None,
    max_body_bytes: Annotated[int | None, _limit("Request body before 413 (default 16 MiB)")] = None,
    max_image_bytes: Annotated[int | None, _limit("Encoded image before 413 (default 10 MiB)")] = None,
    max_image_pixels: Annotated[int | None, _limit("Image width*height (default 4096*4096)")] = None,
    max_image_frames: Annotated[int | None, _limit("Frames of an animated image (default 64)")] = None,
    image_format: Annotated[
        list[str] | None, _limit("Accepted image format, repeatable (default PNG JPEG WEBP GIF BMP)")
    ] = None,
    max_queued_image_bytes: Annotated[
        int | None, _limit("Decoded image bytes waiting (default 1 GiB)")
    ] = None,
    decode_workers: Annotated[int | None, _limit("Image-decoding threads (default 2)")] = None,
    max_images: Annotated[
        int | None, _limit("Images per request, where the model takes several (default 8)")
    ] = None,
    model_process: Annotated[
        bool | None,
        typer.Option(
            "--model-process/--model-in-thread",
            help="Run the model in its own process (default), or in a thread of the server's",
            show_default=False,
        ),
    ] = None,
    max_context_tokens: Annotated[
        int | None, _limit("Prompt + max_tokens bound (default model's context)")
    ] = None,
    default_max_tokens: Annotated[
        int | None, _limit("max_tokens when a request gives none (default 64)")
    ] = None,
    max_tokens_cap: Annotated[int | None, _limit("Largest max_tokens (default 512)")] = None,
    max_stop_strings: Annotated[int | None, _limit("Stop strings per request (default 4)")] = None,
    max_n: Annotated[int | None, _limit("Largest n (default 8)")] = None,
    max_top_logprobs: Annotated[int | None, _limit("Largest top_logprobs (default 20)")] = None,
    allowed_image_host: Annotated[
        list[str] | None, _limit("Host remote images may come from, repeatable (default none)")
    ] = None,
    image_fetch_timeout_s: Annotated[
        float | None, _limit("Time to fetch a remote image (default 10)")
    ] = None,
    allowed_host: Annotated[
        list[str] | None, _limit("Accepted Host header, repeatable; '*' any (default loopback names)")
    ] = None,
    cors_origin: Annotated[
        list[str] | None, _limit("Origin allowed by CORS, repeatable (default none)")
    ] = None,
    header_timeout_s: Annotated[float | None, _limit("Time to send request headers (default 10)")] = None,
    body_timeout_s: Annotated[
        float | None, _limit("Time to send a request body before 408 (default 30)")
    ] = None,
    idle_timeout_s: Annotated[float | None, _limit("Idle keep-alive connection (default 5)")] = None,
    shutdown_grace_s: Annotated[
        float | None, _limit("Running requests' time to finish on exit (default 10)")
    ] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with a web page at /."""
    from vlmkit.serve import serve as run_server

    given = dict(locals())
    renamed = {
        "image_format": "image_formats",
        "allowed_image_host": "allowed_image_hosts",
        "allowed_host": "allowed_hosts",
        "cors_origin": "cors_origins",
    }
    fixed = {"model", "host", "port", "api_key", "config", "run_server"}
    limits = {renamed.get(k, k): v for k, v in given.items() if k not in fixed and v is not None}
    run_server(
        str(model),
        host=host,
        port=port,
        api_key=api_key,
        config_file=str(config) if config else None,
        **limits,
    )


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (or its model/ folder) with LoRA adapters")],
    out: Annotated[Path, typer.Argument(help="Empty output folder")],
    merge: Annotated[
        bool, typer.Option("--merge/--no-merge", help="Merge LoRA into the base weights")
    ] = True,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="vlmkit-composed VLMs: auto (LLaVA folder where possible), llava, or vlmkit",
        ),
    ] = "auto",
) -> None:
    """Write a full model folder loadable by transformers (and vLLM) without vlmkit."""
    from vlmkit.errors import ConfigError
    from vlmkit.train.export import export_merged

    if not merge:
        raise ConfigError(
            "only --merge export is implemented; the run's model/ folder already holds the adapters"
        )
    if format not in ("auto", "llava", "vlmkit"):
        raise ConfigError(f"--format {format!r} is not one of auto, llava, vlmkit")
    console.print(
        f"merged model written to [bold]{escape(str(export_merged(run, out, format=format)))}[/bold]"
    )


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Run config YAML")],
    gpus: Annotated[int, typer.Option(help="Number of GPUs")] = 1,
    strategy: Annotated[str, typer.Option(help="ddp | fsdp | zero2 | zero3")] = "ddp",
    set_: Overrides = None,
) -> None:
    """Estimate GPU memory per device (weights, optimiser state, activations) before training."""
    from vlmkit.config import load_config
    from vlmkit.train.plan import format_plan, plan_memory

    console.print(
        escape(
            format_plan(
                plan_memory(load_config(recipe_path(config), set_ or []), gpus=gpus, strategy=strategy)
            )
        )
    )


def show_examples(predictions: Path, count: int = 6) -> None:
    rows = [json.loads(line) for line in predictions.read_text().splitlines()[:count]]
    table = Table(title="a few answers")
    for column in ("question", "answer", "expected"):
        table.add_column(column)
    for row in rows:
        mark = "" if row["score"] == 1 else " ✗"
        table.add_row(escape(row["question"]), escape(row["prediction"]) + mark, escape(row["answers"][0]))
    console.print(table)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except VlmkitError as error:
        err_console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
