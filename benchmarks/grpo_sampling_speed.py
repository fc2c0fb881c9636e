#!/usr/bin/env python3
"""Seconds to sample one GRPO step's groups: G answers for each of B prompts, three ways.

`repeated`: the prompt repeated G times (G encodes, G tower passes, G prefills: GRPO before
2026-12-08); `expanded`: encoded once, `num_return_sequences` G with transformers' own input
expansion (one encode, G prefills: what every transformers family gets); `shared`: encoded once
and, for vlmkit's own VLM, one prefill whose KV cache the G rows share (what GRPO runs now).
Rounds interleaved in one process; also checks that `shared` draws the tokens `repeated` draws at
the same seed. Writes benchmarks/results/grpo_sampling_speed.json. Usage:
  python benchmarks/grpo_sampling_speed.py --model runs/demo/model [--prompts 32] [--generations 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_cases import environment, write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@contextlib.contextmanager
def without_shared_prefill(model: Any) -> Iterator[None]:
    """transformers' expansion only: the VLM's shared-prefill path switched off for the block."""
    cls = type(model)
    original = cls._can_share_prompts
    cls._can_share_prompts = lambda self, kwargs: False
    try:
        yield
    finally:
        cls._can_share_prompts = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(RESULTS, "grpo_sampling_speed.json"))
    args = ap.parse_args()

    from vlmkit.data.sources import load_samples
    from vlmkit.models.adapters import load_adapter

    adapter = load_adapter(args.model)
    prompts = load_samples({"source": "easyvqa", "split": "train", "limit": args.prompts})
    rows = [p for p in prompts for _ in range(args.generations)]
    sample: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": True}
    grouped = {"num_return_sequences": args.generations}

    def repeated(seed: int | None = None) -> list[str]:
        return adapter.generate(rows, seed=seed, **sample)

    def expanded() -> list[str]:
        with without_shared_prefill(adapter.model):
            return adapter.generate(prompts, generation_options=grouped, **sample)

    def shared(seed: int | None = None) -> list[str]:
        return adapter.generate(prompts, seed=seed, generation_options=grouped, **sample)

    same_tokens = shared(seed=3) == repeated(seed=3)
    ways = {"repeated": repeated, "expanded": expanded, "shared": shared}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for way in ways.values():
        way()  # warm-up
    for _ in range(args.rounds):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    write_json(
        args.out,
        {
            "benchmark": "grpo_sampling_speed",
            "command": "python " + " ".join(sys.argv),
            "prompts": args.prompts,
            "generations": args.generations,
            "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds,
            "median_s": median,
            "speedup_vs_repeated": {name: median["repeated"] / m for name, m in median.items()},
            "shared_draws_the_repeated_tokens_at_one_seed": same_tokens,
            "threads": torch.get_num_threads(),
            "environment": environment(torch.device("cpu")),
        },
    )
    print({name: round(m, 4) for name, m in median.items()}, "same tokens:", same_tokens)


if __name__ == "__main__":
    main()
