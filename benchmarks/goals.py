#!/usr/bin/env python3
"""Issue 8's goals against the benchmark JSONs of one folder: which are met, missed, or not measured.

Reads every train_speed / gen_speed JSON (by its records' shape) in a folder and checks:
  training   vlmkit >= 1.5x the reference's samples/s at <= 0.7x its peak GPU memory, per case;
  losses     vlmkit's loss matches the reference's on the same batch (the dtype's tolerance);
  MFU        seed 000 full fine-tune >= 45% (6NT, 798 TFLOP/s) at its best measured batch;
  generation vlmkit >= 2x the reference's tokens/s at batch 16, per case.
Only GPU figures count: a CPU run (no `peak_gib`, no CUDA device) is listed but never "met".
Prints a markdown table and writes goals.json beside the JSONs. Usage:
  python benchmarks/goals.py [FOLDER]          # default benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SPEED, MEMORY, MFU, GENERATION = 1.5, 0.7, 0.45, 2.0


def verdict(ok: bool | None) -> str:
    return "n/a (not a GPU figure)" if ok is None else ("met" if ok else "missed")


def on_gpu(payload: dict[str, Any]) -> bool:
    return str(payload.get("machine", {}).get("device", "")).startswith("cuda")


def training_rows(name: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    gpu = on_gpu(payload)
    for record in payload.get("results", []):
        case = f"{record.get('case')} {record.get('variant') or ''}".strip()
        if "error" in record:
            rows.append(
                {
                    "file": name,
                    "goal": "training",
                    "case": case,
                    "value": record["error"][:80],
                    "verdict": "error",
                }
            )
            continue
        check = record.get("loss_check")
        if check:
            rows.append(
                {
                    "file": name,
                    "goal": "loss matches",
                    "case": case,
                    "value": f"rel diff {check['rel_diff']:.2e} (tolerance {check['rel_tolerance']})",
                    "verdict": verdict(bool(check["match"]) if gpu else None),
                }
            )
        ratio = record.get("ratio")
        if ratio:
            speed, memory = ratio.get("samples_s"), ratio.get("peak_gib")
            ok = None if not gpu or memory is None else speed >= SPEED and memory <= MEMORY
            rows.append(
                {
                    "file": name,
                    "goal": f"speed >= {SPEED}x at memory <= {MEMORY}x",
                    "case": case,
                    "value": f"{speed}x samples/s, {memory if memory is not None else '-'}x peak",
                    "verdict": verdict(ok),
                }
            )
        if record.get("case") == "seed000" and record.get("variant") == "full_ft" and "vlmkit" in record:
            mfu = record["vlmkit"]["mfu_6NT"]
            rows.append(
                {
                    "file": name,
                    "goal": f"MFU >= {MFU:.0%}",
                    "case": f"{case}, batch {record['batch']}",
                    "value": f"{mfu:.1%}",
                    "verdict": verdict(mfu >= MFU if gpu else None),
                }
            )
    return rows


def generation_rows(name: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for record in payload.get("results", []):
        entry = record.get("batch_16")
        if not entry:
            continue
        ratio = entry["ratio_tok_s"]
        rows.append(
            {
                "file": name,
                "goal": f"generation >= {GENERATION}x tokens/s at batch 16",
                "case": record["case"],
                "value": f"{ratio}x (tokens identical: {entry['tokens']['identical']})",
                "verdict": verdict(ratio >= GENERATION if on_gpu(payload) else None),
            }
        )
    return rows


def check(folder: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, list) or not results or not isinstance(results[0], dict):
            continue
        if "loss_check" in results[0] or "ratio" in results[0] or "batch" in results[0]:
            rows += training_rows(path.name, payload)
        elif any(key.startswith("batch_") for key in results[0]):
            rows += generation_rows(path.name, payload)
    return rows


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    rows = check(folder)
    print("| file | goal | case | value | verdict |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['file']} | {row['goal']} | {row['case']} | {row['value']} | {row['verdict']} |")
    (folder / "goals.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
