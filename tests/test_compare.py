"""compare_evals on hand-built pairs of eval folders, and the paired bootstrap behind it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.errors import DataError
from vlmkit.eval.compare import compare_evals
from vlmkit.eval.stats import paired_bootstrap_ci


def write_run(
    root: Path,
    scores: dict[str, float],
    metric: str = "exact_match",
    model: str = "m",
    types: dict[str, str] | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    images = root.parent / "images"
    images.mkdir(exist_ok=True)
    lines = []
    for sample_id, score in scores.items():
        image = images / f"{sample_id}.png"
        if not image.exists():
            Image.new("RGB", (40, 40), (200, 50, 50)).save(image)
        lines.append(
            {
                "id": sample_id,
                "question": f"what is {sample_id}?",
                "prediction": f"{model} says {score}",
                "answers": ["gold"],
                "score": score,
                "image": str(image),
                "meta": {"question_type": (types or {}).get(sample_id, "any")},
            }
        )
    (root / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = {
        "metric": metric,
        "score": sum(scores.values()) / len(scores),
        "n": len(scores),
        "model": model,
    }
    (root / "summary.json").write_text(
        json.dumps({**summary, "data": "easyvqa:test", "command": "x", "created": "t"})
    )
    return root


def test_flips_counts_and_outputs(tmp_path: Path) -> None:
    a = {"s0": 1.0, "s1": 1.0, "s2": 0.0, "s3": 0.0, "s4": 1.0, "s5": 0.0, "only_a": 1.0}
    b = {"s0": 1.0, "s1": 0.0, "s2": 1.0, "s3": 1.0, "s4": 1.0, "s5": 0.0, "only_b1": 0.0, "only_b2": 0.0}
    types = {"s0": "color", "s1": "color", "s2": "shape", "s3": "shape", "s4": "shape", "s5": "color"}
    run_a = write_run(tmp_path / "a", a, model="model-a", types=types)
    run_b = write_run(tmp_path / "b", b, model="model-b", types=types)
    out = tmp_path / "cmp"
    summary = compare_evals(run_a, run_b, out)
    assert summary["n_shared"] == 6 and summary["only_in_a"] == 1 and summary["only_in_b"] == 2
    assert summary["flips"] == {"wrong_to_right": 2, "right_to_wrong": 1, "threshold": 0.5}
    assert summary["a"]["score"] == pytest.approx(3 / 6) and summary["b"]["score"] == pytest.approx(4 / 6)
    assert summary["difference"]["estimate"] == pytest.approx(1 / 6)
    by_type = {row["group"]: row for row in summary["categories"]["question_type"]}
    assert by_type["shape"]["a"] == pytest.approx(1 / 3) and by_type["shape"]["b"] == 1.0
    assert by_type["color"]["difference"]["estimate"] == pytest.approx(-1 / 3)

    assert json.loads((out / "comparison.json").read_text()) == summary
    markdown = (out / "comparison.md").read_text()
    assert "wrong -> right **2**, right -> wrong **1**" in markdown
    assert "only in A: 1; only in B: 2" in markdown
    assert "| s2 |" in markdown and "| s3 |" in markdown and "| s1 |" in markdown
    assert "| s4 |" not in markdown  # right in both: not a flip
    thumbs = re.findall(r"\((comparison_assets/[a-z0-9_]+\.jpg)\)", markdown)
    assert len(thumbs) == 3 and all((out / thumb).is_file() for thumb in thumbs)
    page = (out / "comparison.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == 3
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)


def test_difference_interval_has_the_right_sign(tmp_path: Path) -> None:
    ids = [f"q{i}" for i in range(40)]
    weak = {sample_id: float(i % 4 == 0) for i, sample_id in enumerate(ids)}  # 10 of 40 right
    strong = {sample_id: float(i % 4 != 3) for i, sample_id in enumerate(ids)}  # 30 of 40 right
    run_weak = write_run(tmp_path / "weak", weak)
    run_strong = write_run(tmp_path / "strong", strong)
    better = compare_evals(run_weak, run_strong, tmp_path / "up", n_bootstrap=300)
    assert better["difference"]["estimate"] == pytest.approx(0.5)
    assert 0 < better["difference"]["low"] < 0.5 < better["difference"]["high"]
    assert "B is better than A" in (tmp_path / "up" / "comparison.md").read_text()
    worse = compare_evals(run_strong, run_weak, tmp_path / "down", n_bootstrap=300)
    assert worse["difference"]["high"] < 0
    assert worse["flips"]["right_to_wrong"] == 20 and worse["flips"]["wrong_to_right"] == 0
    same = compare_evals(run_weak, run_weak, tmp_path / "same", n_bootstrap=300)
    # Newcombe's paired score interval (0/1 scores): contains 0, narrow, not a zero-width point
    assert same["difference"]["estimate"] == 0.0
    assert -0.05 < same["difference"]["low"] <= 0.0 <= same["difference"]["high"] < 0.05
    assert same["difference"]["method"].startswith("Newcombe")
    assert "No significant difference" in (tmp_path / "same" / "comparison.md").read_text()


def test_graded_scores_flip_when_crossing_half(tmp_path: Path) -> None:
    a = {"up": 0.3, "still_right": 0.6, "down": 0.9, "still_wrong": 0.0}
    b = {"up": 0.6, "still_right": 0.9, "down": 0.3, "still_wrong": 0.3}
    summary = compare_evals(
        write_run(tmp_path / "a", a, metric="vqa_accuracy"),
        write_run(tmp_path / "b", b, metric="vqa_accuracy"),
        tmp_path / "out",
    )
    assert summary["flips"]["wrong_to_right"] == 1 and summary["flips"]["right_to_wrong"] == 1
    assert summary["metric"] == "vqa_accuracy"


def test_mismatched_runs_are_one_line_errors(tmp_path: Path) -> None:
    run_a = write_run(tmp_path / "a", {"x": 1.0})
    with pytest.raises(DataError, match=r"exact_match .* anls"):
        compare_evals(run_a, write_run(tmp_path / "b", {"x": 1.0}, metric="anls"), tmp_path / "o1")
    with pytest.raises(DataError, match=r"share no sample ids \(1 and 2 ids\)") as error:
        compare_evals(run_a, write_run(tmp_path / "c", {"y": 1.0, "z": 0.0}), tmp_path / "o2")
    assert "\n" not in str(error.value)


def test_paired_bootstrap_ci() -> None:
    a = [0.0, 1.0, 0.5, 0.25] * 5
    shifted = paired_bootstrap_ci(a, [x + 0.1 for x in a], n=200)
    assert shifted.estimate == pytest.approx(0.1)
    assert shifted.low == pytest.approx(0.1) and shifted.high == pytest.approx(0.1)  # pairing removes spread
    noisy = paired_bootstrap_ci([0, 1] * 20, [1, 0] * 20, n=200, seed=1)
    assert noisy.estimate == 0.0 and noisy.low < 0 < noisy.high
    with pytest.raises(DataError, match="same shape"):
        paired_bootstrap_ci([1.0], [1.0, 0.0])
