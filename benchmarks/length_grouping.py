#!/usr/bin/env python3
"""Padding with and without length-grouped batching (`train_sampling_strategy: group_by_length`).

Padding is a property of the batches, not of the machine, so this measures the lever's effect
exactly, on the CPU: the share of token slots that are padding over one epoch of easy-VQA
training batches, random order (Trainer's default) against transformers' LengthGroupedSampler fed
with the adapter's `sample_lengths`. Rows are single questions, or merged questions
(`turns_per_image: 3`, whose rows hold 1 to 3 turns). Models: the demo's (17 image tokens) and
the same LM behind a 224 px DINOv2-shaped tower (257 image tokens, as in seed 000).
Writes benchmarks/results/length_grouping.json. Usage:
  python benchmarks/length_grouping.py [--questions 64]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shared_prefix_speed import build
from speed_cases import environment, write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def padding(adapter: Any, rows: list[Any], order: list[int], batch: int) -> dict[str, Any]:
    pad = adapter.tokenizer.pad_token_id
    slots = real = 0
    for start in range(0, len(order), batch):
        ids = adapter.encode([rows[i] for i in order[start : start + batch]], train=True)["input_ids"]
        slots += ids.numel()
        real += int((ids != pad).sum())
    return {"token_slots": slots, "padding_fraction": round(1 - real / slots, 4)}


def main() -> None:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from vlmkit.data.conversations import merge_turns
    from vlmkit.data.sources import load_samples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=64, help="questions per batch, about")
    ap.add_argument("--cases", default="demo,dinov2-224")
    ap.add_argument("--out", default=os.path.join(RESULTS, "length_grouping.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    samples = load_samples("easyvqa:train")
    texts = [m["content"] for s in samples for m in s.messages]
    results = []
    for case in args.cases.split(","):
        adapter = build(case, texts)
        for turns in (None, 3):
            rows = merge_turns(samples, turns, 0) if turns else list(samples)
            batch = max(1, round(args.questions * len(rows) / len(samples)))
            lengths = adapter.sample_lengths(rows)
            generator = torch.Generator().manual_seed(0)
            orders = {
                "random": torch.randperm(len(rows), generator=generator).tolist(),
                "group_by_length": list(LengthGroupedSampler(batch, lengths=lengths, generator=generator)),
            }
            record = {
                "case": case,
                "rows": "one question" if turns is None else f"turns_per_image: {turns}",
                "rows_per_batch": batch,
                **{name: padding(adapter, rows, order, batch) for name, order in orders.items()},
            }
            record["token_slots_ratio"] = round(
                record["group_by_length"]["token_slots"] / record["random"]["token_slots"], 4
            )
            print(record, flush=True)
            results.append(record)
    payload = {
        **environment(torch.device("cpu")),
        "command": " ".join(["python", *sys.argv]),
        "settings": {"questions_per_batch": args.questions, "source": "easyvqa:train"},
        "results": results,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
