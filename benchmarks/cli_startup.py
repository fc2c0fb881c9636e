"""Benchmark: how fast the CLI answers `--help` and refuses broken configs and arguments.

Goal (issue 21, item 5): every config / data-spec / CLI-argument error and `vlmkit --help` in
under 1 s on the 2-core machine. Each command runs `--repeats` times, alternating between this
tree and a baseline tree (`--baseline-src`, e.g. a worktree of the commit before), and the
median wall time of each is recorded with their ratio. Writes benchmarks/results/cli_startup.json.

    python benchmarks/cli_startup.py [--baseline-src ../old/src] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"
GOAL_S = 1.0

CONFIG = {
    "name": "bench",
    "model": {
        "init": {
            "vision": {"config": {"model_type": "resnet", "hidden_sizes": [8, 16], "depths": [1, 1]}},
            "language_model": {
                "config": {"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4}
            },
        }
    },
    "data": {"train": {"source": "easyvqa", "split": "train"}},
    "training": {"max_steps": 1},
}


def cases(folder: Path) -> dict[str, list[str]]:
    good = folder / "run.yaml"
    # a run folder of its own: a tree that validates late starts a run before it fails
    good.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(folder / "run")}))
    bad_yaml = folder / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    train = ["train", str(good), "--set"]
    return {
        "help": ["--help"],
        "train --help": ["train", "--help"],
        "missing config file": ["train", str(folder / "nope.yaml")],
        "invalid YAML": ["train", str(bad_yaml)],
        "unknown training key": [*train, "training.num_train_epoch=3"],
        "learning rate as text": [*train, "training.learning_rate=fast"],
        "scheduler typo": [*train, "training.lr_scheduler_type=cosin"],
        "unknown projector": [*train, "model.init.projector=mlpx"],
        "unknown backbone type": [*train, "model.init.vision.config.model_type=resnetx"],
        "heads do not divide width": [*train, "model.init.language_model.config.num_attention_heads=7"],
        "duplicate stage names": [*train, "stages=[{name: a}, {name: a}]"],
        "unknown data source": [*train, "data.train.source=easyvqax"],
        "unknown source option": [*train, "data.train.options={image_folder: x}"],
        "eval --limit 0": ["eval", "--model", str(folder), "--limit", "0"],
        "eval unknown metric": ["eval", "--model", str(folder), "--metric", "bleu9"],
        "eval unknown source": ["eval", "--model", str(folder), "--data", "nosuch:test"],
    }


def timed(src: Path, args: list[str]) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlmkit", *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return elapsed, done.returncode, last


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-src", type=Path, default=None, help="src/ of the tree to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "cli_startup.json")
    args = parser.parse_args()
    trees = {"current": SRC}
    if args.baseline_src is not None:
        trees["baseline"] = args.baseline_src.resolve()
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in cases(Path(tmp)).items():
            times: dict[str, list[float]] = {tree: [] for tree in trees}
            outcome: dict[str, dict] = {}
            for _ in range(args.repeats):
                for tree, src in trees.items():  # alternated, so drift hits both alike
                    elapsed, code, last = timed(src, argv)
                    times[tree].append(elapsed)
                    outcome[tree] = {"exit_code": code, "last_line": last[:300]}
            row = {
                tree: {"median_s": round(statistics.median(t), 3), **outcome[tree]}
                for tree, t in times.items()
            }
            if "baseline" in row:
                row["baseline_over_current"] = round(
                    row["baseline"]["median_s"] / row["current"]["median_s"], 2
                )
            row["under_goal"] = row["current"]["median_s"] < GOAL_S
            results[name] = row
            print(
                f"{name:28s} {row['current']['median_s']:6.2f} s  {row.get('baseline', {}).get('median_s', '')}"
            )
    record = {
        "benchmark": "cli_startup",
        "goal": {"every_case_median_s_below": GOAL_S},
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "trees": {tree: str(src) for tree, src in trees.items()},
        "repeats": args.repeats,
        "cases": results,
        "met_goal": all(row["under_goal"] for row in results.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
