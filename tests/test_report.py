"""Eval reports render from an eval folder, and the bootstrap intervals behind them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmkit.errors import DataError
from vlmkit.eval.report import length_bucket, load_eval, reference_length, write_report
from vlmkit.eval.stats import bootstrap_ci

# (question_type, answer_type, answers, prediction, score): "color" all right, "shape" all wrong.
ROWS = [
    ("color", "other", ["red"], "red", 1.0),
    ("color", "other", ["blue"], "blue", 1.0),
    ("color", "other", ["green"], "green", 1.0),
    ("color", "other", ["teal"], "teal", 1.0),
    ("shape", "other", ["circle"], "<script>alert(1)</script>", 0.0),
    ("shape", "other", ["big red triangle"], "square", 0.0),
    ("yes/no", "yes/no", ["yes"], "yes", 1.0),
    ("yes/no", "yes/no", ["no"], "yes", 0.0),
]


def make_eval_dir(root: Path, rows: list[tuple[str, str, list[str], str, float]], **summary: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (question_type, answer_type, answers, prediction, score) in enumerate(rows):
        image = root / "images" / f"{index}.png"
        image.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (30 * index % 255, 90, 160)).save(image)
        lines.append(
            {
                "id": f"s{index}",
                "question": f"question {index}?",
                "prediction": prediction,
                "answers": answers,
                "score": score,
                "image": f"images/{index}.png" if index != 7 else None,
                "meta": {"question_type": question_type, "answer_type": answer_type},
            }
        )
    (root / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    scores = [row[4] for row in rows]
    defaults = {
        "metric": "exact_match",
        "score": sum(scores) / len(scores),
        "n": len(rows),
        "model": "tiny-vlm",
        "data": "easyvqa:test",
        "command": "vlmkit eval tiny-vlm --data easyvqa:test",
        "created": "2026-11-23T12:00:00",
        "seconds": 3.2,
        "generation": {"max_new_tokens": 8},
    }
    (root / "summary.json").write_text(json.dumps({**defaults, **summary}))
    return root


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_eval_dir(tmp_path_factory.mktemp("eval") / "run", ROWS)
    write_report(root)
    return root


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + 1)
    return text[start : following if following > 0 else None]


def test_report_files_exist_and_show_the_score(report_dir: Path) -> None:
    markdown = (report_dir / "report.md").read_text()
    page = (report_dir / "report.html").read_text()
    assert "exact_match: 0.6250" in markdown and "exact_match: 0.6250" in page
    assert "95% CI" in markdown
    assert "tiny-vlm" in markdown and "easyvqa:test" in page
    assert "seconds" in markdown  # extra scalar summary keys are shown, not rejected


def test_report_breaks_scores_down_by_meta(report_dir: Path) -> None:
    markdown = (report_dir / "report.md").read_text()
    by_question = section(markdown, "## By question_type")
    # Wilson score intervals for 0/1 scores: never zero-width at 0% or 100% (4/4: 0.5101 - 1)
    assert "| color | 4 | 1.0000 | 0.5101 – 1.0000 |" in by_question
    assert "| shape | 2 | 0.0000 | 0.0000 – 0.6576 |" in by_question
    assert "| yes/no | 2 | 0.5000 |" in by_question
    assert "| other | 6 | 0.6667 |" in section(markdown, "## By answer_type")
    by_length = section(markdown, "## By answer length")
    assert "| 1 | 7 | 0.7143 |" in by_length and "| 3 | 1 | 0.0000 |" in by_length


def test_report_plots_are_pngs(report_dir: Path) -> None:
    markdown = (report_dir / "report.md").read_text()
    plots = re.findall(r"\((report_assets/score_by_[a-z_]+\.png)\)", markdown)
    assert sorted(Path(p).name for p in plots) == [
        "score_by_answer_length.png",
        "score_by_answer_type.png",
        "score_by_question_type.png",
    ]
    for plot in plots:
        with Image.open(report_dir / plot) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_html_is_self_contained(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?https?:", page, re.IGNORECASE)
    assert "<link" not in page and "<script" not in page  # predictions are escaped, not run
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert page.count('src="data:image/jpeg;base64,') == 2  # s4 and s5; s7 has no image


def test_gallery_lists_only_wrong_answers_with_thumbnails(report_dir: Path) -> None:
    markdown = (report_dir / "report.md").read_text()
    gallery = section(markdown, "## Wrong answers")
    assert "(3 of 3, score < 0.5)" in gallery
    assert "| s4 |" in gallery and "| s5 |" in gallery and "| s7 |" in gallery
    assert "| s0 |" not in gallery
    assert "&lt;script&gt;" in gallery  # no raw HTML in Markdown either
    assert "(no image)" in gallery  # s7 has image null
    thumbs = re.findall(r"\((report_assets/thumbs/\d+\.jpg)\)", gallery)
    assert len(thumbs) == 2
    for thumb in thumbs:
        with Image.open(report_dir / thumb) as image:
            assert image.format == "JPEG" and max(image.size) <= 160


def test_report_without_meta_or_images(tmp_path: Path) -> None:
    root = make_eval_dir(tmp_path / "plain", [("x", "y", ["a"], "a", 1.0), ("x", "y", ["b"], "c", 0.0)])
    lines = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("meta")
        line["image"] = "does/not/exist.png"
    (root / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_report(root)
    markdown = (root / "report.md").read_text()
    assert "## By question_type" not in markdown and "exact_match: 0.5000" in markdown
    assert "(no image)" in markdown


def test_bleu_report_uses_corpus_bleu(tmp_path: Path) -> None:
    rows = [
        ("q", "a", ["the cat sat on the mat today"], "the cat sat on the mat today", 1.0),
        ("q", "a", ["a dog ran in the park"], "a dog ran", 0.3679),
    ]
    root = make_eval_dir(tmp_path / "bleu", rows, metric="bleu", score=0.7408)
    write_report(root, n_bootstrap=50)
    markdown = (root / "report.md").read_text()
    assert "bleu: 0.7408" in markdown
    assert "corpus bleu of each subset" in markdown
    assert "recomputed" not in markdown  # the recomputed corpus BLEU agrees with the summary


def test_load_eval_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no predictions\.jsonl"):
        load_eval(tmp_path)
    root = make_eval_dir(tmp_path / "bad", ROWS[:2])
    with (root / "predictions.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match=r"predictions\.jsonl line 3 is not valid JSON") as error:
        load_eval(root)
    assert "\n" not in str(error.value)
    (root / "predictions.jsonl").write_text(json.dumps({"id": "x", "prediction": "y"}) + "\n")
    with pytest.raises(DataError, match="lacks score"):
        load_eval(root)


def test_reference_length_uses_most_common_answer() -> None:
    assert reference_length(["a big dog", "dog", "dog"]) == 1
    assert reference_length(["two words", "one"]) == 2  # tie: the first listed
    assert length_bucket(["one two three four five six"]) == "5+"
    assert length_bucket([]) == "0"


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    scores = [1.0, 0.0] * 50
    first = bootstrap_ci(scores, n=500, seed=3)
    assert first == bootstrap_ci(scores, n=500, seed=3)
    assert first.estimate == 0.5
    assert 0.35 < first.low < 0.5 < first.high < 0.65
    constant = bootstrap_ci([0.25] * 10)
    assert constant.low == constant.high == constant.estimate == 0.25
    rows = np.array([[1, 2], [3, 4], [5, 6]], dtype=float)  # a statistic over summed rows
    ratio = bootstrap_ci(rows, n=200, statistic=lambda block: float(block[:, 0].sum() / block[:, 1].sum()))
    assert ratio.estimate == pytest.approx(9 / 12) and ratio.low <= ratio.estimate <= ratio.high
    with pytest.raises(DataError):
        bootstrap_ci([])
