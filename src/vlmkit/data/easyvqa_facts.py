"""What each easy-VQA image shows (its shape and colour), read off the answers to its questions.

easy-VQA ships questions, not labels. Every image has one shape in one colour, so each answered
question is a fact about it: "what is the blue shape?" -> rectangle says shape=rectangle and
colour=blue; "is there not a red shape?" -> yes says "not red". A fact no question reveals (about
6% of images lack one of the two) stays None; captions then mention only what is known, and
zero-shot tasks leave such images out and say how many.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cache

from vlmkit.data.sources.easyvqa import COLORS, NEGATIONS, SHAPES, easyvqa_split


@dataclass(frozen=True)
class ImageFacts:
    image_id: int
    image: str  # path of the PNG
    shape: str | None
    color: str | None


def _mentioned(words: list[str], vocabulary: tuple[str, ...]) -> set[str]:
    return {word for word in words if word in vocabulary}


def _resolve(present: set[str], absent: set[str], vocabulary: tuple[str, ...]) -> str | None:
    if len(present) == 1:
        return next(iter(present))
    if not present:
        remaining = set(vocabulary) - absent
        if len(remaining) == 1:  # every other value was ruled out
            return next(iter(remaining))
    return None  # unknown, or contradictory answers


@cache
def image_facts(split: str = "train", path: str | None = None) -> tuple[ImageFacts, ...]:
    """Shape and colour of every image of `split`, in image-id order."""
    records, images = easyvqa_split(split, path)
    present: dict[int, set[str]] = defaultdict(set)
    absent: dict[int, set[str]] = defaultdict(set)
    for question, answer, image_id in records:
        words = question.rstrip("?").split()
        named = _mentioned(words, SHAPES + COLORS)
        if answer in ("yes", "no"):
            negated = any(word in NEGATIONS for word in words)
            is_there = (answer == "yes") != negated
            (present if is_there else absent)[image_id].update(named)
        else:  # "what is the blue shape?" -> "rectangle": both words describe the image
            present[image_id].update(named | {answer})
    return tuple(
        ImageFacts(
            image_id=image_id,
            image=str(images / f"{image_id}.png"),
            shape=_resolve(present[image_id] & set(SHAPES), absent[image_id], SHAPES),
            color=_resolve(present[image_id] & set(COLORS), absent[image_id], COLORS),
        )
        for image_id in sorted(set(present) | set(absent))
    )
