"""Smoke test of the speed benchmarks: --tiny on CPU, one case each, JSON with the promised fields."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *args],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=240,
    )
    return json.loads(out.read_text())


def _check_environment(payload: dict) -> None:
    for key in ("command", "created", "git_commit", "machine", "versions"):
        assert key in payload, key
    assert {"torch", "transformers", "peft"} <= set(payload["versions"])


def test_train_speed_tiny(tmp_path):
    payload = _run(
        "train_speed.py",
        tmp_path / "train.json",
        "--cases",
        "seed000_full",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--memory-steps",
        "1",
    )
    _check_environment(payload)
    assert "6 * N * T" in payload["flop_formula"]
    (record,) = payload["results"]
    assert "error" not in record, record.get("traceback")
    check = record["loss_check"]
    assert math.isfinite(check["reference"]) and math.isfinite(check["vlmkit"])
    assert check["match"], check
    for side in ("reference", "vlmkit"):
        numbers = record[side]
        for key in ("samples_s", "tokens_s", "mfu_6NT", "step_s", "peak_rss_growth_mib"):
            assert math.isfinite(numbers[key]), (side, key)
        assert numbers["samples_s"] > 0 and numbers["losses_finite"]
    assert record["ratio"]["samples_s"] > 0
    assert record["tokens_per_step"] == record["batch"] * record["seq_len"]


def test_train_speed_runs_each_side_with_its_own_attention_kernel(tmp_path):
    """The two share the LM's modules, so the benchmark switches the kernel before each step."""
    payload = _run(
        "train_speed.py",
        tmp_path / "train.json",
        *("--cases", "seed003_lora", "--attention", "eager"),
        *("--steps", "1", "--warmup", "1", "--memory-steps", "1"),
    )
    (record,) = payload["results"]
    assert "error" not in record, record.get("traceback")
    assert record["attention"] == {"reference": "sdpa", "vlmkit": "eager"}
    assert record["vlmkit_levers"]["model.speed"]["attention"] == "eager"
    assert record["loss_check"]["match"], record["loss_check"]


def test_gen_speed_tiny(tmp_path):
    payload = _run(
        "gen_speed.py",
        tmp_path / "gen.json",
        "--cases",
        "seed000",
        "--batches",
        "1,2",
        "--new-tokens",
        "4",
        "--reps",
        "1",
        "--warmup",
        "1",
    )
    _check_environment(payload)
    (record,) = payload["results"]
    assert "error" not in record, record.get("traceback")
    assert record["generation_settings"]["cache_implementation"] == "static"
    for batch in ("batch_1", "batch_2"):
        entry = record[batch]
        assert entry["tokens"]["identical"], entry["tokens"]
        assert entry["reference"]["tok_s"] > 0 and entry["vlmkit"]["tok_s"] > 0


def test_shared_prefix_speed_seed000_tiny(tmp_path):
    payload = _run(
        "shared_prefix_speed.py",
        tmp_path / "prefix.json",
        *("--cases", "seed000", "--rounds", "1", "--steps", "2", "--questions", "8", "--turns", "3"),
    )
    _check_environment(payload)
    (record,) = payload["results"]
    assert record["attention"] in {"eager", "sdpa"}  # Gemma 2's default: eager where sdpa cannot soft-cap
    one, merged = record["settings"]["one question per row"], record["settings"]["turns_per_image: 3"]
    assert merged["token_slots_per_question"] < one["token_slots_per_question"]
    assert merged["rows_per_batch"] < one["rows_per_batch"]
    assert record["speedup"]["turns_per_image: 3"] > 0
