"""easy-VQA (the `easy-vqa` PyPI package): 64x64 shapes, 13 single-word answers, shipped offline."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.data.sample import Sample
from vlmkit.data.sources import register_source
from vlmkit.errors import DataError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")
NEGATIONS = ("not", "no")  # words that turn a yes/no question around


def easyvqa_root() -> Path:
    try:
        import easy_vqa
    except ImportError:  # pragma: no cover - it is a core dependency
        raise DataError("the easy-vqa package is not installed; run `pip install easy-vqa`") from None
    return Path(easy_vqa.__file__).parent / "data"


def question_type(question: str, answer: str) -> str:
    """Which fact a question probes: shape, color, or a yes/no check (negated or not)."""
    if answer in ("yes", "no"):
        negated = any(f" {word} " in f" {question} " for word in NEGATIONS)
        return "yes/no (negated)" if negated else "yes/no"
    return "shape" if answer in SHAPES else "color"


def easyvqa_split(split: str, path: str | None = None) -> tuple[list[tuple[str, str, int]], Path]:
    """The split's (question, answer, image id) records and its images folder."""
    if split not in ("train", "test"):
        raise DataError(f"easyvqa has splits 'train' and 'test', not {split!r}")
    root = Path(path) if path else easyvqa_root()
    questions_file = root / split / "questions.json"
    if not questions_file.is_file():
        raise DataError(f"easyvqa questions not found at {questions_file}; reinstall easy-vqa")
    return json.loads(questions_file.read_text()), root / split / "images"


@register_source("easyvqa", default_metric="exact_match", max_new_tokens=3)
def load_easyvqa(split: str = "train", path: str | None = None) -> list[Sample]:
    records, images = easyvqa_split(split, path)
    return [
        Sample.vqa(
            id=f"easyvqa-{split}-{index}",
            image=str(images / f"{image_id}.png"),
            question=question,
            answers=[answer],
            question_type=question_type(question, answer),
            answer_type="yes/no" if answer in ("yes", "no") else "other",
            image_id=image_id,
        )
        for index, (question, answer, image_id) in enumerate(records)
    ]
