"""Benchmark: DPO and GRPO on easy-VQA from a deliberately under-trained model, on the CPU.

Goal (issue 20, item 5): starting from the demo recipe cut short (about 90-95% test exact match),
(a) GRPO with the `exact_match` reward on the train split and (b) DPO on pairs built from the
model's own wrong answers on the train split against the reference answer each cut the test
error rate by at least 30% relative, within 10 minutes of training on the 2-core machine, shown
with `vlmkit compare` (paired bootstrap CI of the difference, flips both ways).

Every step runs the real command line in a subprocess; the JSON records each command, its wall
time, the training time the trainer reports, the load average and CPU seconds around it, the
scores and the comparison.

    python benchmarks/rl_easyvqa.py [--work DIR] [--base-set key=value ...] [--grpo-set ...]
        [--dpo-set ...] [--reuse-base]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from easyvqa_demo import git_commit  # benchmarks/ is on the path when run as a script

RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent
# The demo recipe cut short: `what` 4 epochs (of 6) and `vqa` 1.5 epochs (of 3.5). (`vqa` 1 epoch
# gave 91.04% on one machine and 86.79%, below the goal's 90-95% range, on another; 1.5 gave 91.39%.)
BASE_SET = ["stages.what.training.num_train_epochs=4", "stages.vqa.training.num_train_epochs=1.5"]
TRAINING_BUDGET_S = 600
GOAL_RELATIVE_ERROR_CUT = 0.30


def run(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run one command to completion; its wall time, CPU seconds and load average around it."""
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}); log {log}:\n{tail}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "command": shlex.join(cmd),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "eval" / "summary.json").read_text())


def train_seconds(run_dir: Path) -> float:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = metrics.get("stages", [metrics])
    return round(sum(stage.get("train_runtime_s") or 0.0 for stage in stages), 1)


def compare(base: Path, tuned: Path, out: Path, log: Path) -> dict[str, Any]:
    return compare_folders(base / "eval", tuned / "eval", out, log)


def compare_folders(a: Path, b: Path, out: Path, log: Path) -> dict[str, Any]:
    step = run([str(BIN / "vlmkit"), "compare", str(a), str(b), "--out", str(out)], log)
    result = json.loads((out / "comparison.json").read_text())
    return {
        "step": step,
        "difference": result["difference"],
        "flips": result["flips"],
        "a": result["a"],
        "b": result["b"],
    }


def objective_record(
    name: str, base_score: float, run_dir: Path, steps: dict, comparison: dict
) -> dict[str, Any]:
    score = summary(run_dir)["score"]
    base_error, error = 1.0 - base_score, 1.0 - score
    cut = (base_error - error) / base_error if base_error > 0 else 0.0
    seconds = train_seconds(run_dir)
    return {
        "objective": name,
        "exact_match": score,
        "error_rate": round(error, 5),
        "relative_error_cut": round(cut, 4),
        "train_runtime_s": seconds,
        "steps": steps,
        "comparison": comparison,
        "met_goal": bool(cut >= GOAL_RELATIVE_ERROR_CUT and seconds <= TRAINING_BUDGET_S),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("runs/rl_easyvqa"))
    parser.add_argument("--out", type=Path, default=RESULTS / "rl_easyvqa.json")
    parser.add_argument("--base-set", action="append", default=None, help="override of the base (demo) run")
    parser.add_argument(
        "--grpo-set", action="append", default=[], help="override of configs/easyvqa_grpo.yaml"
    )
    parser.add_argument("--dpo-set", action="append", default=[], help="override of configs/easyvqa_dpo.yaml")
    parser.add_argument("--reuse-base", action="store_true", help="keep WORK/base if it is finished")
    parser.add_argument("--only", choices=["grpo", "dpo", "sft"], default=None)
    parser.add_argument("--reuse-pairs", action="store_true", help="keep WORK/mistakes.jsonl if it exists")
    parser.add_argument(
        "--pair-beams", type=int, default=4, help="rank this many answers for pairs (0: sample instead)"
    )
    parser.add_argument("--pair-samples", type=int, default=4, help="with --pair-beams 0: sampled answers")
    parser.add_argument("--pair-temperature", type=float, default=2.0)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    vlmkit = str(BIN / "vlmkit")
    base_set = args.base_set if args.base_set is not None else BASE_SET
    base = work / "base"
    steps: dict[str, Any] = {}

    if not (args.reuse_base and (base / "eval" / "summary.json").is_file()):
        cmd = [vlmkit, "train", "demo.yaml", "--set", f"output_dir={base}"]
        for item in base_set:
            cmd += ["--set", item]
        steps["base_train"] = run(cmd, work / "base.log")
    base_score = summary(base)["score"]
    record: dict[str, Any] = {
        "benchmark": "rl_easyvqa",
        "goal": {"relative_error_cut": GOAL_RELATIVE_ERROR_CUT, "training_budget_s": TRAINING_BUDGET_S},
        "command": "python " + shlex.join(sys.argv),
        "git_commit": git_commit(),
        "machine": machine(),
        "base": {
            "overrides": base_set,
            "exact_match": base_score,
            "steps": steps,
            "train_runtime_s": train_seconds(base),
        },
        "objectives": {},
    }

    if args.only in (None, "grpo"):
        grpo = work / "grpo"
        cmd = [vlmkit, "train", "easyvqa_grpo.yaml", "--no-resume", "--set", f"output_dir={grpo}"]
        cmd += ["--set", f"model.pretrained={base / 'model'}"]
        for item in args.grpo_set:
            cmd += ["--set", item]
        grpo_steps = {"train": run(cmd, work / "grpo.log")}
        comparison = compare(base, grpo, work / "compare-grpo", work / "compare-grpo.log")
        record["objectives"]["grpo"] = objective_record("grpo", base_score, grpo, grpo_steps, comparison)
        record["objectives"]["grpo"]["overrides"] = args.grpo_set

    if args.only in (None, "dpo"):
        dpo = work / "dpo"
        pairs = work / "mistakes.jsonl"
        pair_cmd = [sys.executable, "-m", "vlmkit.train.objectives.pairs", str(base / "model"), str(pairs)]
        dpo_steps: dict[str, Any] = {}
        if not (args.reuse_pairs and pairs.is_file()):
            pair_cmd += ["--split", "train", "--max-new-tokens", "3", "--batch-size", "256"]
            if args.pair_beams:
                pair_cmd += ["--beams", str(args.pair_beams)]
            else:
                pair_cmd += ["--samples", str(args.pair_samples), "--temperature", str(args.pair_temperature)]
            dpo_steps["pairs"] = run(pair_cmd, work / "pairs.log")
        dpo_steps["pair_count"] = sum(1 for _ in pairs.open())
        cmd = [vlmkit, "train", "easyvqa_dpo.yaml", "--no-resume", "--set", f"output_dir={dpo}"]
        cmd += ["--set", f"model.pretrained={base / 'model'}", "--set", f"data.train.path={pairs}"]
        for item in args.dpo_set:
            cmd += ["--set", item]
        dpo_steps["train"] = run(cmd, work / "dpo.log")
        comparison = compare(base, dpo, work / "compare-dpo", work / "compare-dpo.log")
        record["objectives"]["dpo"] = objective_record("dpo", base_score, dpo, dpo_steps, comparison)
        record["objectives"]["dpo"]["overrides"] = args.dpo_set

    if args.only in (None, "sft"):
        # The control: the DPO recipe's rows, learning rate, steps and frozen tower with the
        # supervised loss on the reference answers alone; what DPO adds is the difference.
        sft = work / "sft"
        config = sft_control_config(work / "sft_control.yaml")
        cmd = [vlmkit, "train", str(config), "--no-resume", "--set", f"output_dir={sft}"]
        cmd += ["--set", f"model.pretrained={base / 'model'}"]
        for item in args.dpo_set:
            if not item.startswith(("dpo.", "data.")):
                cmd += ["--set", item]
        sft_steps = {"train": run(cmd, work / "sft.log")}
        comparison = compare(base, sft, work / "compare-sft", work / "compare-sft.log")
        record["control"] = objective_record("sft", base_score, sft, sft_steps, comparison)
        if "dpo" in record["objectives"]:
            dpo_eval, sft_eval = dpo / "eval", sft / "eval"
            record["control"]["dpo_vs_control"] = compare_folders(
                sft_eval, dpo_eval, work / "compare-dpo-sft", work / "compare-dpo-sft.log"
            )

    record["met_goal"] = bool(record["objectives"]) and all(
        o["met_goal"] for o in record["objectives"].values()
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    brief = {
        k: {f: o[f] for f in ("exact_match", "relative_error_cut", "train_runtime_s", "met_goal")}
        for k, o in record["objectives"].items()
    }
    print(json.dumps({"base": base_score, **brief}))


def sft_control_config(path: Path) -> Path:
    """The shipped DPO recipe as plain SFT on the train split (same rows per step, same steps)."""
    from importlib import resources

    import yaml

    raw = yaml.safe_load((resources.files("vlmkit") / "configs" / "easyvqa_dpo.yaml").read_text())
    raw.pop("objective")
    raw.pop("dpo")
    raw["name"] = "easyvqa_sft_control"
    raw["data"]["train"] = {"source": "easyvqa", "split": "train"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def machine() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


if __name__ == "__main__":
    main()
