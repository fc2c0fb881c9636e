"""Image-caption pairs as Samples: webdataset shards, a local folder or JSONL, and easy-VQA captions.

A caption Sample is one user turn asking for a brief description and one assistant turn holding
the caption, so the same sources train CLIP (which reads only the caption) and align a VLM later.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from vlmkit.data.images import ImageLike
from vlmkit.data.sample import Sample
from vlmkit.data.sources import register_source, register_stream
from vlmkit.data.sources.jsonl import jsonl_records
from vlmkit.errors import DataError

logger = logging.getLogger(__name__)

CAPTION_INSTRUCTION = "Provide a brief description of the given image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Phrasings of easy-VQA facts; one is picked per image with a seeded RNG.
BOTH_PHRASINGS = (
    "a {color} {shape}",
    "a {shape} that is {color}",
    "a picture of a {color} {shape}",
    "the {shape} is {color}",
    "a {color} {shape} in the image",
)
SHAPE_PHRASINGS = ("a {shape}", "a picture of a {shape}")
COLOR_PHRASINGS = ("a {color} shape", "a shape that is {color}")


def caption_sample(
    id: str, image: ImageLike | None, caption: str, *, alternatives: Iterable[str] = (), **meta: Any
) -> Sample:
    """The shared shape of a caption pair: instruction from the user, caption from the assistant.

    `answers` holds every reference caption, the assistant's first; CLIP training can draw any.
    """
    return Sample(
        id=id,
        image=image,
        messages=[
            {"role": "user", "content": CAPTION_INSTRUCTION},
            {"role": "assistant", "content": caption},
        ],
        answers=[caption, *(a for a in alternatives if a != caption)],
        meta=dict(meta),
    )


def caption_of(sample: Sample) -> str:
    """The caption of a caption Sample (its last assistant turn)."""
    for message in reversed(sample.messages):
        if message["role"] == "assistant":
            return message["content"]
    if sample.answers:
        return sample.answers[0]
    raise DataError(f"sample {sample.id!r} has no caption (no assistant turn); use a caption source")


def is_caption_shaped(sample: Sample) -> bool:
    return (
        len(sample.messages) == 2
        and sample.messages[0] == {"role": "user", "content": CAPTION_INSTRUCTION}
        and sample.messages[1]["role"] == "assistant"
    )


# -- easy-VQA --------------------------------------------------------------------------------------
def easyvqa_captions(shape: str | None, color: str | None) -> list[str]:
    """Every phrasing of what is known about an image ("a blue rectangle", "a rectangle that is blue")."""
    if shape and color:
        return [p.format(shape=shape, color=color) for p in BOTH_PHRASINGS]
    if shape:
        return [p.format(shape=shape) for p in SHAPE_PHRASINGS]
    if color:
        return [p.format(color=color) for p in COLOR_PHRASINGS]
    return []


@register_source("easyvqa_captions", default_metric="exact_match")
def load_easyvqa_captions(split: str = "train", path: str | None = None, seed: int = 0) -> list[Sample]:
    """One caption Sample per easy-VQA image, built from what its questions reveal.

    The assistant turn is one phrasing picked with a seeded RNG; `answers` lists them all, so
    CLIP training draws a fresh phrasing each epoch instead of memorising which image got which.
    """
    from vlmkit.data.easyvqa_facts import image_facts

    rng = random.Random(seed)
    samples = []
    for facts in image_facts(split, path):
        phrasings = easyvqa_captions(facts.shape, facts.color)
        if not phrasings:  # nothing known about the image: no caption to give
            continue
        samples.append(
            caption_sample(
                f"easyvqa-{split}-img{facts.image_id}",
                facts.image,
                rng.choice(phrasings),
                alternatives=phrasings,
                image_id=facts.image_id,
                shape=facts.shape,
                color=facts.color,
            )
        )
    return samples


# -- a local folder or JSONL -----------------------------------------------------------------------
def _from_jsonl(file: Path) -> list[Sample]:
    samples = []
    for where, record in jsonl_records(file):
        if not isinstance(record, dict) or "image" not in record or "caption" not in record:
            raise DataError(f'{where}: needs "image" and "caption" fields')
        meta = {k: v for k, v in record.items() if k not in ("id", "image", "caption")}
        image = str((file.parent / record["image"]).resolve())
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        if not captions:
            raise DataError(f"{where}: empty caption list")
        sample_id = str(record.get("id", where))
        samples.append(
            caption_sample(sample_id, image, str(captions[0]), alternatives=map(str, captions), **meta)
        )
    return samples


def _from_folder(folder: Path) -> list[Sample]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    samples, uncaptioned = [], []
    for image in images:
        text_file = image.with_suffix(".txt")
        if not text_file.is_file():
            uncaptioned.append(image)
            continue
        samples.append(
            caption_sample(
                str(image.relative_to(folder).with_suffix("")), str(image), text_file.read_text().strip()
            )
        )
    if uncaptioned:
        logger.warning(
            "%d image(s) in %s have no same-stem .txt caption and were left out (first: %s)",
            len(uncaptioned),
            folder,
            uncaptioned[0],
        )
    return samples


@register_source("captions", default_metric="exact_match")
def load_captions(split: str = "train", path: str | None = None) -> list[Sample]:
    """`path` is a JSONL file of {"image", "caption"} (images relative to it; "caption" may be a list
    of reference captions), a folder holding
    `{split}.jsonl`, or a folder of images each with a same-stem `.txt` caption."""
    if path is None:
        raise DataError("the captions source needs a path (data: {source: captions, path: FOLDER_OR_JSONL})")
    root = Path(path)
    if root.is_file():
        return _from_jsonl(root)
    if not root.is_dir():
        raise DataError(f"caption data {root} does not exist")
    if (root / f"{split}.jsonl").is_file():
        return _from_jsonl(root / f"{split}.jsonl")
    return _from_folder(root)


# -- webdataset shards -----------------------------------------------------------------------------
@register_source("webdataset", default_metric="exact_match")
def load_webdataset(
    split: str = "train",
    path: str | Sequence[str] | None = None,
    on_bad_sample: Literal["skip", "fail"] = "skip",
) -> list[Sample]:
    """Every sample of a set of tar shards (img2dataset layout), decoded into memory.

    Training and `vlmkit eval` stream the shards instead (`iter_webdataset`, `iter_samples`).
    Corrupt images are counted and reported; `on_bad_sample: fail` stops at the first.
    """
    return list(iter_webdataset(split, path, on_bad_sample))


@register_stream("webdataset")
def iter_webdataset(
    split: str = "train",
    path: str | Sequence[str] | None = None,
    on_bad_sample: Literal["skip", "fail"] = "skip",
) -> Iterator[Sample]:
    """The shards' samples decoded one at a time as they are consumed."""
    from vlmkit.data.shards import ShardReadStats, iter_shards

    if path is None:
        raise DataError('the webdataset source needs a path (e.g. path: "shards/{000000..000009}.tar")')
    stats = ShardReadStats()
    yield from iter_shards(path, on_bad_sample=on_bad_sample, stats=stats)
    stats.report(logger)
