"""Benchmark (equivalence): does vlmkit's Trainer-based pipeline optimise like a plain PyTorch loop?

Earlier demo notes said a plain PyTorch experiment loop "learned faster than the pipeline, for a
reason not found". This script settles the optimiser/Trainer half of that question: it trains the
demo model for a few steps of one stage with vlmkit's Trainer (recording every batch it really
fed the model), then trains an identical copy with a hand-written loop on exactly those batches —
torch AdamW with Trainer's decay / no-decay parameter groups, the same warmup + cosine schedule,
gradient clipping at `max_grad_norm` — and compares the losses step by step. It also records the
gradient norms before clipping (so you can see whether clipping is active).

    python benchmarks/trainer_vs_loop.py [--stage vqa] [--steps 30] [--threads 1]

Writes benchmarks/results/trainer_vs_loop_<stage>.json with the command, machine and versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
from importlib import resources
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", default="vqa", help="a stage of configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic sums)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import TrainingArguments, get_scheduler, set_seed
    from transformers.trainer_callback import PrinterCallback

    from vlmkit.config import load_config
    from vlmkit.data.sources import load_samples
    from vlmkit.train.collate import BadSampleLog, Collator, SampleDataset
    from vlmkit.train.levers import apply_speed
    from vlmkit.train.runner import TRAINING_DEFAULTS, apply_freeze, build_model
    from vlmkit.train.trainer import VlmkitTrainer

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="vlmkit-trainer-vs-loop-"))
    with resources.as_file(resources.files("vlmkit") / "configs" / "demo.yaml") as path:
        config = load_config(path, [f"output_dir={tmp}"])
    stages = {stage.name: stage for stage in config.resolved_stages()}
    stage = stages[args.stage]
    set_seed(config.seed)
    samples = load_samples(stage.data.train)  # type: ignore[union-attr]
    adapter = build_model(config, [samples])
    apply_freeze(adapter, stage)
    apply_speed(adapter, config.model.speed)
    model_copy = copy.deepcopy(adapter.model)  # the loop's model: same weights, same frozen parts

    training = {**stage.training, "max_steps": args.steps, "logging_steps": 1}
    targs = TrainingArguments(
        **{**TRAINING_DEFAULTS, "seed": config.seed, **training, "output_dir": str(tmp / "trainer")}
    )
    fed: list[dict] = []
    trainer_losses: list[float] = []

    class Recording(VlmkitTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fed.append({k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in inputs.items()})
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            trainer_losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    trainer = Recording(
        model=adapter.model,
        args=targs,
        train_dataset=SampleDataset(samples),
        data_collator=Collator(adapter, config.data.on_bad_sample, BadSampleLog(tmp / "bad.jsonl")),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()

    # The plain loop, on exactly the batches Trainer fed.
    model = model_copy
    model.train()
    frozen_eval = [m for m in adapter.model.modules() if not m.training]
    names_eval = {name for name, m in adapter.model.named_modules() if m in frozen_eval}
    for name, module in model.named_modules():
        if name in names_eval:
            module.eval()  # a frozen tower runs in eval mode in the pipeline too
    decay = set(trainer.get_decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": targs.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=targs.learning_rate, betas=(targs.adam_beta1, targs.adam_beta2), eps=targs.adam_epsilon
    )
    scheduler = get_scheduler(
        targs.lr_scheduler_type,
        optimizer,
        num_warmup_steps=targs.get_warmup_steps(args.steps),
        num_training_steps=args.steps,
    )
    loop_losses, grad_norms = [], []
    for batch in fed:
        loss = model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], targs.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loop_losses.append(float(loss.detach()))
        grad_norms.append(float(norm))

    diffs = [abs(a - b) for a, b in zip(trainer_losses, loop_losses, strict=True)]
    weight_diff = max(
        float((a.detach() - b.detach()).abs().max())
        for a, b in zip(adapter.model.parameters(), model.parameters(), strict=True)
    )
    record = {
        "benchmark": "trainer_vs_loop",
        "command": "python " + " ".join(sys.argv),
        "stage": args.stage,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "trainer_losses": trainer_losses,
        "loop_losses": loop_losses,
        "max_abs_loss_diff": max(diffs),
        "final_loss_diff": diffs[-1],
        "max_abs_weight_diff": weight_diff,
        "grad_norm_before_clip": {
            "min": min(grad_norms),
            "max": max(grad_norms),
            "clip": targs.max_grad_norm,
        },
        "steps_clipped": sum(norm > targs.max_grad_norm for norm in grad_norms),
    }
    out = args.out or RESULTS / f"trainer_vs_loop_{args.stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    summary = {k: record[k] for k in ("max_abs_loss_diff", "max_abs_weight_diff", "steps_clipped")}
    sys.stdout.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
