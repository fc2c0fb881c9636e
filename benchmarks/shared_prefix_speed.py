#!/usr/bin/env python3
"""Questions per second of a training step: one question per row vs merged, isolated turns.

`data.train.turns_per_image: N` puts up to N questions about one image in a row whose turns see
the image prefix and themselves only (docs/architecture.md). This times the step the demo's
`vqa` stage runs (tower frozen, its features cached; projector + LM train with AdamW) on
easy-VQA, both ways, rounds interleaved in one process, and reports the ratio. Cases: the
demo's model (17 image tokens) and the same LM behind a 224 px DINOv2-shaped tower (257 tokens),
random weights (speed does not depend on them); on a GPU, `seed000`: DINOv2-base + Gemma2-2B
(257 image tokens), every part training as in seed 000's recipe (`--tiny` shrinks it for a CPU).
Writes benchmarks/results/shared_prefix_speed.json. Usage:
  python benchmarks/shared_prefix_speed.py [--rounds 5] [--steps 20] [--turns 3,5]
  python benchmarks/shared_prefix_speed.py --cases seed000 --questions 16 --attention flex_attention \
      --out benchmarks/results/shared_prefix_speed_seed000.json          # H100
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_cases import (
    add_device_arguments,
    device_and_dtype,
    environment,
    seed000_configs,
    to_device,
    write_json,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DINOV2_224 = {
    "model_type": "dinov2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "patch_size": 14,
}


def build(
    case: str,
    texts: list[str],
    *,
    tiny: bool = False,
    attention: str | None = None,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> Any:
    from pathlib import Path

    from vlmkit.cli import recipe_path
    from vlmkit.config import SpeedSpec, load_config
    from vlmkit.models.build import build_vlm
    from vlmkit.train.levers import apply_speed

    init = load_config(recipe_path(Path("demo.yaml"))).model.init
    assert init is not None
    frozen_tower = case != "seed000"
    if case == "dinov2-224":
        init = init.model_copy(
            update={"vision": init.vision.model_copy(update={"config": DINOV2_224}), "image_size": 224}
        )
    elif case == "seed000":
        vision, text = seed000_configs(tiny)
        parts = {
            "vision": {"config": {**vision.to_dict(), "model_type": "dinov2"}},
            "language_model": {"config": {**text.to_dict(), "model_type": "gemma2"}},
        }
        init = init.model_validate({**init.model_dump(), **parts, "image_size": vision.image_size})
    adapter = build_vlm(init, texts, token_cache=True, image_cache_size=5000)
    if case == "seed000":
        # Gemma's 256k vocabulary, though the word tokenizer has ~40 words: the head's cost and
        # the embedding's optimiser state are those of the real model.
        adapter.model.language_model.resize_token_embeddings(text.vocab_size)
    adapter.model.to(device=device, dtype=dtype)
    adapter.model.set_trainable(vision=not frozen_tower, projector=True, lm=True)
    apply_speed(adapter, SpeedSpec(vision_feature_cache=frozen_tower, attention=attention))
    return adapter


def batches(samples: list[Any], questions: int, turns: int | None, seed: int) -> list[list[Any]]:
    """Batches of about `questions` questions: rows of one question, or merged rows of `turns`."""
    from vlmkit.data.conversations import merge_turns

    rows = merge_turns(samples, turns, seed) if turns else list(samples)
    random.Random(seed).shuffle(rows)
    per_row = len(samples) / len(rows)
    size = max(1, round(questions / per_row))
    return [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]


def timed_steps(
    adapter: Any, optimizer: torch.optim.Optimizer, batches: list[list[Any]]
) -> tuple[float, int, int]:
    """Seconds, questions and token slots for one pass of encode + forward + backward + step."""
    questions = slots = 0
    dev = adapter.model.device
    synchronize = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    for rows in batches:
        batch = to_device(adapter.encode(rows, train=True), dev)
        adapter.model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        questions += sum(len(row.messages) // 2 for row in rows)
        slots += batch["input_ids"].numel()
    synchronize()
    return time.perf_counter() - start, questions, slots


def run_case(case: str, samples: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    texts = [m["content"] for s in samples for m in s.messages]
    dev, dtype = device_and_dtype(args)
    adapter = build(case, texts, tiny=args.tiny, attention=args.attention, device=dev, dtype=dtype)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=adapter.model.device.type == "cuda")
    cuda = adapter.model.device.type == "cuda"
    settings = {"one question per row": None, **{f"turns_per_image: {n}": n for n in args.turns}}
    plans = {
        name: batches(samples, args.questions, turns, 0)[: args.steps] for name, turns in settings.items()
    }
    peaks: dict[str, float] = {}
    for name, plan in plans.items():  # warm the token and feature caches, and the allocator
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timed_steps(adapter, optimizer, plan)
        if cuda:
            peaks[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    rates: dict[str, list[float]] = {name: [] for name in plans}
    info: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for name, plan in plans.items():
            seconds, questions, slots = timed_steps(adapter, optimizer, plan)
            rates[name].append(questions / seconds)
            info[name] = {
                "rows_per_batch": len(plan[0]),
                "questions_per_step": questions / len(plan),
                "token_slots_per_question": slots / questions,
                **({"peak_gib": peaks[name]} if name in peaks else {}),
            }
    base = statistics.median(rates["one question per row"])
    return {
        "case": case,
        "image_tokens": adapter.model.config.num_image_tokens,
        "attention": adapter.model.language_model.config._attn_implementation,
        "trainable_params": sum(p.numel() for p in params),
        "settings": {
            name: {**info[name], "questions_per_s_median": statistics.median(r), "questions_per_s": r}
            for name, r in rates.items()
        },
        "speedup": {name: statistics.median(r) / base for name, r in rates.items() if settings[name]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--questions", type=int, default=64, help="questions per step, about")
    ap.add_argument("--turns", default="3,5", type=lambda text: [int(n) for n in text.split(",")])
    ap.add_argument("--cases", default="demo,dinov2-224", help="demo, dinov2-224, seed000")
    ap.add_argument("--tiny", action="store_true", help="seed000 with tiny configs (CPU smoke test)")
    ap.add_argument("--attention", default=None, help="model.speed.attention (e.g. flex_attention on a GPU)")
    add_device_arguments(ap, "shared_prefix_speed")
    args = ap.parse_args()
    args.out = args.out or os.path.join(RESULTS, "shared_prefix_speed.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    from vlmkit.data.sources import load_samples

    samples = load_samples("easyvqa:train")
    results = []
    for case in args.cases.split(","):
        record = run_case(case, samples, args)
        for name, ratio in record["speedup"].items():
            print(f"{case}, {name}: {ratio:.2f}x the questions/s of one question per row", flush=True)
        results.append(record)
    payload = {
        **environment(device_and_dtype(args)[0]),
        "command": " ".join(["python", *sys.argv]),
        "torch_threads": torch.get_num_threads(),
        "settings": vars(args),
        "results": results,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
