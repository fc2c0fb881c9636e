#!/usr/bin/env python3
"""vlmkit generation against the transformers reference, same weights, same prompts, greedy.

reference  the family's own `generate` (dynamic KV cache, no compile), as hf_baselines.py times it;
vlmkit     the call ModelAdapter.generate makes (vlmkit's VLM: its LM's generate on merged
           embeddings), with the `model.speed` generation levers: generation_cache (static KV
           cache) and compile_generation (transformers compiles the decoding step; CUDA only).
Every prompt generates exactly --new-tokens tokens (min_new_tokens, so EOS from random weights
cannot stop it early). Batches 1 and 16, interleaved repetitions after a warm-up (which absorbs
compilation). The outputs are compared token by token.
Writes benchmarks/results/gen_speed[_tiny].json. Usage:
  python benchmarks/gen_speed.py [--tiny] [--cases seed000,seed002,seed003] [--cache static|dynamic] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_cases import (
    BUILDERS,
    add_device_arguments,
    device_and_dtype,
    environment,
    free,
    kernel_notes,
    quiet_offline_transformers,
    side_kernels,
    to_device,
    use_kernel,
    write_json,
)

from vlmkit.config import SpeedSpec
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.levers import generation_settings

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GEN_CASES = {"seed000": "seed000_full", "seed002": "seed002_lora", "seed003": "seed003_full"}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def comparison(ref: torch.Tensor, ours: torch.Tensor) -> dict[str, Any]:
    """Token identity, and for each differing row the first position where it differs."""
    same = ref.shape == ours.shape and bool(torch.equal(ref, ours))
    out: dict[str, Any] = {"identical": same, "rows": int(ref.shape[0])}
    if not same and ref.shape == ours.shape:
        differs = (ref != ours).any(dim=1)
        first = (ref != ours).int().argmax(dim=1)
        out["rows_differing"] = int(differs.sum())
        out["first_difference_at"] = {int(i): int(first[i]) for i in differs.nonzero().flatten()[:8]}
    elif not same:
        out["shapes"] = [list(ref.shape), list(ours.shape)]
    return out


def run_case(name: str, args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import GenerationConfig

    speed = SpeedSpec(
        generation_cache=args.cache, compile_generation=args.cache == "static" and not args.no_compile
    )
    built = BUILDERS[GEN_CASES[name]](args.tiny, dev, dtype, speed)
    ref_model = built.ref_model
    if hasattr(ref_model, "merge_and_unload"):  # LoRA case: generation speed of the merged model
        ref_model = ref_model.merge_and_unload()
    ours_model = built.vlmkit_model if isinstance(built.vlmkit_model, VisionLanguageModel) else ref_model
    ref_model.eval()
    ours_model.eval()
    kernels = side_kernels(ref_model, args.attention)
    settings = generation_settings(speed)
    n = args.new_tokens
    record: dict[str, Any] = {
        "case": name,
        "model": built.model_name,
        "new_tokens": n,
        "vlmkit_levers": {
            "model.speed": {k: getattr(speed, k) for k in ("generation_cache", "compile_generation")}
        },
        "generation_settings": settings,
        "attention": kernels,
        "notes": [*built.notes[:1], *kernel_notes(ref_model, kernels)],
    }
    for b in args.batches:
        inputs = built.make_batch(b, prompt_only=True)
        for key in ("labels", "image_keys"):
            inputs.pop(key, None)
        if "token_type_ids" in inputs:  # PaliGemma: a prompt is all prefix
            inputs["token_type_ids"] = torch.zeros_like(inputs["token_type_ids"])
        inputs = to_device(inputs, dev)
        prompt_len = int(inputs["input_ids"].shape[1])

        def reference(inputs: dict[str, Any] = inputs, prompt_len: int = prompt_len) -> torch.Tensor:
            out = ref_model.generate(
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0
            )
            return out[:, prompt_len:]

        config = GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0, **settings
        )

        def vlmkit(
            inputs: dict[str, Any] = inputs, prompt_len: int = prompt_len, config: Any = config
        ) -> torch.Tensor:
            if isinstance(ours_model, VisionLanguageModel):  # returns only the new tokens
                return ours_model.generate(**inputs, generation_config=config)
            return ours_model.generate(**inputs, generation_config=config)[:, prompt_len:]

        times: dict[str, list[float]] = {"reference": [], "vlmkit": []}
        outputs: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for i in range(args.warmup + args.reps):
                for label, fn in (("reference", reference), ("vlmkit", vlmkit)):
                    use_kernel(ref_model, kernels, label)
                    sync(dev)
                    t0 = time.perf_counter()
                    tokens = fn()
                    sync(dev)
                    if i >= args.warmup:
                        times[label].append(time.perf_counter() - t0)
                    outputs[label] = tokens.cpu()
        entry: dict[str, Any] = {"prompt_len": prompt_len}
        for label in ("reference", "vlmkit"):
            med = statistics.median(times[label])
            entry[label] = {"s": round(med, 4), "tok_s": round(b * outputs[label].shape[1] / med, 1)}
        entry["ratio_tok_s"] = round(entry["vlmkit"]["tok_s"] / entry["reference"]["tok_s"], 3)
        entry["tokens"] = comparison(outputs["reference"], outputs["vlmkit"])
        record[f"batch_{b}"] = entry
        print(
            {
                "case": name,
                "batch": b,
                "ratio": entry["ratio_tok_s"],
                "identical": entry["tokens"]["identical"],
            }
        )
    if built.cleanup:
        built.cleanup()
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--cases", default=",".join(GEN_CASES))
    ap.add_argument("--batches", default="1,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--cache", choices=["static", "dynamic"], default="static", help="model.speed.generation_cache"
    )
    ap.add_argument("--no-compile", action="store_true", help="model.speed.compile_generation off")
    ap.add_argument("--attention", default=None, help="vlmkit's model.speed.attention (e.g. flex_attention)")
    add_device_arguments(ap, "gen_speed")
    args = ap.parse_args()
    dev, dtype = device_and_dtype(args)
    quiet_offline_transformers()
    torch.manual_seed(0)
    payload: dict[str, Any] = {
        **environment(dev),
        "settings": {
            "tiny": args.tiny,
            "dtype": str(dtype).removeprefix("torch."),
            "batches": args.batches,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "warmup": args.warmup,
            "compile_note": "transformers compiles decoding only on CUDA; on CPU compile_generation has no effect",
        },
        "results": [],
    }
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        try:
            record = run_case(name, args, dev, dtype)
        except Exception as exc:
            record = {
                "case": name,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
            print({"case": name, "error": record["error"]})
            free()
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        payload["results"].append(record)
    out = args.out or os.path.join(RESULTS, "gen_speed_tiny.json" if args.tiny else "gen_speed.json")
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
