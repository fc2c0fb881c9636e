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


def test_goals_are_met_missed_or_not_gpu_figures(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from goals import check

    def train_record(speed, memory, mfu, match=True):
        return {
            "case": "seed000",
            "variant": "full_ft",
            "batch": 6,
            "loss_check": {"rel_diff": 1e-3, "rel_tolerance": 2e-2, "match": match},
            "ratio": {"samples_s": speed, "peak_gib": memory},
            "vlmkit": {"mfu_6NT": mfu},
        }

    gpu = {"machine": {"device": "cuda:0"}}
    (tmp_path / "train.json").write_text(
        json.dumps({**gpu, "results": [train_record(1.6, 0.65, 0.47), train_record(1.6, 0.8, 0.3, False)]})
    )
    (tmp_path / "cpu.json").write_text(
        json.dumps({"machine": {"device": "cpu"}, "results": [train_record(9.0, 0.1, 0.9)]})
    )
    gen = {"case": "seed000", "batch_16": {"ratio_tok_s": 1.9, "tokens": {"identical": True}}}
    (tmp_path / "gen.json").write_text(json.dumps({**gpu, "results": [gen]}))
    rows = check(tmp_path)
    verdicts = [(row["file"], row["goal"].split()[0], row["verdict"]) for row in rows]
    assert ("train.json", "speed", "met") in verdicts and ("train.json", "speed", "missed") in verdicts
    assert ("train.json", "MFU", "met") in verdicts and ("train.json", "loss", "missed") in verdicts
    assert ("gen.json", "generation", "missed") in verdicts
    assert {v for f, _, v in verdicts if f == "cpu.json"} == {"n/a (not a GPU figure)"}
