#!/usr/bin/env python3
"""vlmkit's training step against the transformers reference, side by side in one process.

For each seed case (speed_cases.py) the two run over the SAME weights and the SAME batch:
  reference  the family's own forward (vocabulary logits at every position, transformers' loss),
             loss.backward(), torch AdamW (fused on CUDA) -- the loop of shared/anchors/hf_baselines.py;
  vlmkit     VlmkitTrainer.training_step (its compute_loss, the model with `model.speed` levers),
             then the Trainer's own optimiser (training.optim, adamw_torch_fused on CUDA).
Phases:
  1. loss check: both losses on the same batch before any update (must agree to the dtype's tolerance);
  2. memory: each step alone (the other's optimiser freed): peak = torch.cuda.max_memory_allocated
     (weights + grads + optimiser state + activations, as hf_baselines); on CPU the resident-set
     growth above the step's start (weights excluded), sampled every 0.5 ms -- indicative only;
  3. speed: A,B,A,B... interleaved, warm-up rounds excluded; median step time.
Writes benchmarks/results/train_speed[_tiny].json. Usage:
  python benchmarks/train_speed.py [--tiny] [--cases seed000_full,...] [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_cases import (
    BUILDERS,
    CASES,
    FLOP_FORMULA,
    PEAK_FLOPS,
    Built,
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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------------------ memory
class PeakRSS:
    """Peak growth of the resident set above its level at start, sampled on a thread (CPU only)."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mib(self) -> float:
        return round((self.peak - self.start) / 2**20, 2)


def pin_mmap_threshold() -> None:
    """Make glibc hand large blocks back to the OS when freed, so RSS follows live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; fixing it also stops its dynamic growth
    except OSError:
        pass


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ steps
def reference_optimizer(built: Built, dev: torch.device) -> torch.optim.Optimizer:
    params = [p for p in built.ref_model.parameters() if p.requires_grad]
    fused = dev.type == "cuda"
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=fused, foreach=None if fused else True)


def make_trainer(built: Built, dev: torch.device, batch_size: int, workdir: str, optim: str | None) -> Any:
    from transformers import TrainingArguments

    from vlmkit.train.trainer import VlmkitTrainer

    args = TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-6,
        weight_decay=0.0,
        optim=optim or ("adamw_torch_fused" if dev.type == "cuda" else "adamw_torch"),
        lr_scheduler_type="constant",
        report_to="none",
        use_cpu=dev.type == "cpu",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = VlmkitTrainer(model=built.vlmkit_model, args=args)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    return trainer


class Runner:
    """The two training steps over one case, each with its own optimiser (created on demand)."""

    def __init__(self, built: Built, dev: torch.device, batch: dict[str, Any], workdir: str, args: Any):
        self.built, self.dev, self.batch = built, dev, batch
        self.ref_batch = {k: v for k, v in batch.items() if k != "image_keys"}
        self.trainer = make_trainer(built, dev, built.batch_size, workdir, args.optim)
        if args.gradient_checkpointing:  # shared modules: only with --vlmkit-only
            built.vlmkit_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.vlmkit_model = (
            torch.compile(built.vlmkit_model, mode=args.compile_mode) if args.compile else built.vlmkit_model
        )
        self.ref_opt: torch.optim.Optimizer | None = None
        # The two share the language model's modules (and so its config): each step sets its kernel.
        self.kernels = side_kernels(built.ref_model, args.attention)
        # As Trainer's loop computes it (get_batch_samples): the labelled tokens of the step.
        self.num_items = (batch["labels"][:, 1:] != -100).sum()

    def use(self, label: str) -> None:
        """Run `label`'s attention kernel (model.speed.attention for vlmkit) from the next step on."""
        use_kernel(self.built.ref_model, self.kernels, label)

    def ref_step(self) -> float:
        if self.ref_opt is None:
            self.ref_opt = reference_optimizer(self.built, self.dev)
        self.built.ref_model.train()
        out = self.built.ref_forward(**self.ref_batch)
        out.loss.backward()
        self.ref_opt.step()
        self.ref_opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def vlmkit_step(self) -> float:
        trainer = self.trainer
        if trainer.optimizer is None:
            trainer.create_optimizer()
        loss = trainer.training_step(self.vlmkit_model, dict(self.batch), self.num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def drop_optimizers(self) -> None:
        self.ref_opt = None
        self.trainer.optimizer = None
        for p in self.built.ref_model.parameters():
            p.grad = None
        free()

    @torch.no_grad()
    def losses(self) -> tuple[float, float]:
        self.built.ref_model.train()
        self.use("reference")
        ref = float(self.built.ref_forward(**self.ref_batch).loss)
        self.built.vlmkit_model.train()
        self.use("vlmkit")
        inputs = dict(self.batch)
        inputs.pop("image_keys", None)  # the check runs the tower itself (no cache involved)
        ours = float(self.trainer.compute_loss(self.built.vlmkit_model, inputs))
        return ref, ours


def measure_memory(dev: torch.device, step: Callable[[], float], steps: int) -> dict[str, Any]:
    free()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        sync(dev)
        return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    with PeakRSS() as meter:
        for _ in range(steps):
            step()
    return {"peak_rss_growth_mib": meter.growth_mib}


def timed(dev: torch.device, step: Callable[[], float]) -> tuple[float, float]:
    sync(dev)
    t0 = time.perf_counter()
    loss = step()
    sync(dev)
    return time.perf_counter() - t0, loss


def run_case(name: str, args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    speed = SpeedSpec(fused_cross_entropy=args.fused_ce)
    built = BUILDERS[name](args.tiny, dev, dtype, speed)
    bs = args.batch or built.batch_size
    batch = to_device(built.make_batch(bs), dev)
    seq = int(batch["input_ids"].shape[1])
    tokens = bs * seq
    n_all = sum(built.counts.values())
    record: dict[str, Any] = {
        "case": built.case,
        "variant": built.variant,
        "model": built.model_name,
        "batch": bs,
        "seq_len": seq,
        "tokens_per_step": tokens,
        "labelled_tokens_per_step": int((batch["labels"][:, 1:] != -100).sum()),
        "params_total": n_all,
        "params_by_component": built.counts,
        "params_trainable": sum(p.numel() for p in built.ref_model.parameters() if p.requires_grad),
        "vlmkit_levers": {
            "model.speed": {**built.speed.model_dump(), "attention": args.attention},
            "training": {
                "optim": args.optim or ("adamw_torch_fused" if dev.type == "cuda" else "adamw_torch"),
                "gradient_checkpointing": args.gradient_checkpointing,
                "torch_compile": args.compile,
                "torch_compile_mode": args.compile_mode if args.compile else None,
            },
        },
        "notes": built.notes,
    }
    with tempfile.TemporaryDirectory() as workdir:
        runner = Runner(built, dev, batch, workdir, args)
        record["attention"] = dict(runner.kernels)
        record["notes"] = [*record["notes"], *kernel_notes(built.ref_model, runner.kernels)]
        steps = {"reference": runner.ref_step, "vlmkit": runner.vlmkit_step}
        if args.vlmkit_only:
            del steps["reference"]
            record["loss_check"] = None
        else:
            ref_loss, our_loss = runner.losses()
            tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
            diff = abs(ref_loss - our_loss)
            record["loss_check"] = {
                "reference": round(ref_loss, 6),
                "vlmkit": round(our_loss, 6),
                "abs_diff": diff,
                "rel_diff": diff / max(abs(ref_loss), 1e-12),
                "rel_tolerance": tolerance,
                "match": bool(math.isfinite(ref_loss) and diff <= tolerance * abs(ref_loss)),
            }
        memory = {}
        for label, step in steps.items():
            runner.use(label)
            memory[label] = measure_memory(dev, step, args.memory_steps)
            runner.drop_optimizers()
        times: dict[str, list[float]] = {label: [] for label in steps}
        losses: dict[str, list[float]] = {label: [] for label in steps}
        for i in range(args.warmup + args.steps):
            for label, step in steps.items():
                runner.use(label)
                seconds, loss = timed(dev, step)
                losses[label].append(loss)
                if i >= args.warmup:
                    times[label].append(seconds)
        cache = getattr(built.vlmkit_model, "vision_feature_cache", None)
        if cache is not None:
            record["feature_cache"] = {"images": len(cache), "hits": cache.hits, "misses": cache.misses}
    for label in times:
        med = statistics.median(times[label])
        record[label] = {
            "step_s": round(med, 5),
            "step_s_min": round(min(times[label]), 5),
            "step_s_max": round(max(times[label]), 5),
            "samples_s": round(bs / med, 3),
            "tokens_s": round(tokens / med, 1),
            "mfu_6NT": round(6 * n_all * tokens / med / PEAK_FLOPS, 5),
            "losses": [round(x, 5) for x in losses[label]],
            "losses_finite": all(math.isfinite(x) for x in losses[label]),
            **memory[label],
        }
    if "reference" in record:
        ours, ref = record["vlmkit"], record["reference"]
        record["ratio"] = {"samples_s": round(ours["samples_s"] / ref["samples_s"], 3)}
        for key in ("peak_gib", "peak_rss_growth_mib"):
            if ref.get(key):
                record["ratio"][key] = round(ours[key] / ref[key], 3)
    if built.cleanup:
        built.cleanup()
    del runner, built, batch
    free()
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="override the case's batch size")
    ap.add_argument("--fused-ce", action="store_true", help="model.speed.fused_cross_entropy (liger)")
    ap.add_argument(
        "--attention",
        default=None,
        help="vlmkit's model.speed.attention (e.g. flex_attention); the reference keeps the family's default",
    )
    ap.add_argument("--optim", default=None, help="vlmkit's training.optim (e.g. adamw_bnb_8bit)")
    ap.add_argument("--vlmkit-only", action="store_true", help="no reference (batch sweeps for MFU)")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="training.gradient_checkpointing (needs --vlmkit-only)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile vlmkit's model (training.torch_compile)"
    )
    ap.add_argument(
        "--compile-mode",
        default=None,
        help="training.torch_compile_mode, e.g. reduce-overhead (CUDA graphs for launch-bound steps)",
    )
    add_device_arguments(ap, "train_speed")
    args = ap.parse_args()
    if args.gradient_checkpointing and not args.vlmkit_only:
        ap.error("--gradient-checkpointing changes modules the reference shares: add --vlmkit-only")
    dev, dtype = device_and_dtype(args)
    if dev.type == "cpu":
        pin_mmap_threshold()
    quiet_offline_transformers()
    torch.manual_seed(0)
    payload: dict[str, Any] = {
        **environment(dev),
        "flop_formula": FLOP_FORMULA,
        "peak_flops": PEAK_FLOPS,
        "settings": {
            "tiny": args.tiny,
            "dtype": str(dtype).removeprefix("torch."),
            "steps": args.steps,
            "warmup": args.warmup,
            "memory_steps": args.memory_steps,
            "memory_metric": "torch.cuda.max_memory_allocated (GiB)"
            if dev.type == "cuda"
            else "CPU resident-set growth above the step's start, weights excluded (MiB, sampled; indicative)",
        },
        "results": [],
    }
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        try:
            record = run_case(name, args, dev, dtype)
        except Exception as exc:  # keep going: one failing case must not hide the others
            record = {
                "case": name,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
            free()
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        payload["results"].append(record)
        summary = {k: record.get(k) for k in ("case", "variant", "ratio", "error")}
        if record.get("loss_check"):
            summary["loss_match"] = record["loss_check"]["match"]
        print(summary, flush=True)
    out = args.out or os.path.join(RESULTS, "train_speed_tiny.json" if args.tiny else "train_speed.json")
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
