#!/usr/bin/env python3
"""The training dataloader alone: Samples -> adapter.encode batches, no model step.

Runs the collate path vlmkit trains with (SampleDataset + Collator(adapter), the model never
called) over easy-VQA for each setting of the Trainer levers dataloader_num_workers /
dataloader_pin_memory and of model.image_cache_size, and reports samples/s plus the padding
fraction of the batches (the share of token slots that are padding: what padding-free packing
could save at most). The adapter is vlmkit's own VLM with a tiny LM (the encode cost does not
depend on the model's size) and a 224 px image processor, as in the DINOv2 seed.
Writes benchmarks/results/dataloader_speed.json. Usage:
  python benchmarks/dataloader_speed.py [--samples 512] [--batch 16] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_cases import environment, write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_adapter(samples: list[Any], image_cache_size: int) -> Any:
    from vlmkit.models.build import VLMSpec, build_vlm

    spec = VLMSpec.model_validate(
        {
            "vision": {
                "config": {
                    "model_type": "dinov2",
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "patch_size": 14,
                }
            },
            "language_model": {
                "config": {
                    "model_type": "qwen2",
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "intermediate_size": 64,
                }
            },
            "image_size": 224,
            "projector": "linear",
        }
    )
    texts = [m["content"] for s in samples for m in s.messages]
    return build_vlm(spec, texts, image_cache_size=image_cache_size)


def run(adapter: Any, samples: list[Any], batch: int, workers: int, pin: bool, epochs: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from vlmkit.train.collate import BadSampleLog, Collator, SampleDataset

    collator = Collator(adapter, "fail", BadSampleLog(__import__("pathlib").Path(os.devnull)))
    loader = DataLoader(
        SampleDataset(samples),
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=collator,
        persistent_workers=workers > 0,
    )
    per_epoch = []
    slots = real = 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for b in loader:
            slots += b["attention_mask"].numel()
            real += int(b["attention_mask"].sum())
        per_epoch.append(time.perf_counter() - t0)
    return {
        "num_workers": workers,
        "pin_memory": pin,
        "epoch_s": [round(t, 3) for t in per_epoch],
        "samples_s_epoch1": round(len(samples) / per_epoch[0], 1),
        "samples_s_last_epoch": round(len(samples) / per_epoch[-1], 1),
        "padding_fraction": round(1 - real / slots, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--out", default=os.path.join(RESULTS, "dataloader_speed.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmkit.data.sources import load_samples

    samples = load_samples({"source": "easyvqa", "split": "train", "limit": args.samples})
    pins = [False, True] if torch.cuda.is_available() else [False]
    results = []
    for cache_size, workers, pin in itertools.product([0, len(samples)], args.workers, pins):
        adapter = build_adapter(samples, cache_size)
        record = {
            "image_cache_size": cache_size,
            **run(adapter, samples, args.batch, workers, pin, args.epochs),
        }
        print(record, flush=True)
        results.append(record)
    payload = {
        **environment(torch.device("cpu")),
        "settings": {
            "samples": len(samples),
            "batch": args.batch,
            "epochs": args.epochs,
            "source": "easyvqa:train",
        },
        "results": results,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
