"""LLaVA conversation JSON: `[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]`.

The instruction-tuning format of LLaVA, ShareGPT4V and SVIT. Turns must alternate starting with
`human`. Per record:

* one image (`"image": "coco/x.jpg"`): the `<image>` marker in a human turn is removed (each
  adapter places its own image tokens);
* several (`"image": [a, b]`, LLaVA-OneVision): each `<image>` marker becomes an image content
  part, in order, so there must be one marker per image;
* none (LLaVA 665k's text-only ShareGPT rows): a text-only Sample (`image` None);
* SVIT as published: `"image_id": 2345` names `2345.jpg` anywhere under `image_folder` (Visual
  Genome's VG_100K / VG_100K_2), and `conversations` may hold groups `[{"content": [turns]}]`,
  each of which becomes its own Sample. SVIT turns need no `<image>` marker.

`path` is a JSON list or a JSONL file, or a folder holding `{split}.json` / `{split}.jsonl`.
Problems name the file and the record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vlmkit.data.sample import ImagePart, Message, Sample, TextPart, text_of
from vlmkit.data.sources import register_source
from vlmkit.errors import DataError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MARKER = "<image>"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class ImageIndex:
    """SVIT `image_id` -> file: `{image_id}.jpg` anywhere under the folder (found once, on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_stem: dict[str, Path] | None = None

    def find(self, image_id: Any) -> Path | None:
        stem = str(image_id)
        for suffix in IMAGE_SUFFIXES:
            if (self.root / f"{stem}{suffix}").is_file():
                return self.root / f"{stem}{suffix}"
        if self._by_stem is None:
            self._by_stem = {
                p.stem: p
                for p in sorted(self.root.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            }
        return self._by_stem.get(stem)


def _messages(turns: list[Any], where: str) -> list[Message]:
    messages: list[Message] = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise DataError(f"{where}: a turn is {type(turn).__name__}, not an object with from/value")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise DataError(f"{where}: unknown speaker {turn.get('from')!r}; use human/gpt")
        messages.append({"role": role, "content": str(turn.get("value", turn.get("content", "")))})
    body = [m for m in messages if m["role"] != "system"]
    expected = ["user", "assistant"] * (len(body) // 2)
    if [m["role"] for m in body] != expected or not body:
        order = " -> ".join(m["role"] for m in body)
        raise DataError(f"{where}: turns must alternate human, gpt, ... ending on gpt (found {order})")
    return messages


def _with_image_parts(text: str) -> list[TextPart | ImagePart]:
    parts: list[TextPart | ImagePart] = []
    for index, piece in enumerate(re.split(re.escape(MARKER), text)):
        if index:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def conversation_samples(
    record: Any, where: str, image_root: Path, check_images: bool, index: ImageIndex
) -> list[Sample]:
    """One LLaVA / ShareGPT / SVIT record -> its Sample(s)."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is {type(record).__name__}, not an object with id/image/conversations")
    record_id = str(record.get("id", record.get("image_id", "?")))
    where = f"{where} (id {record_id!r})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where} has no conversations list; each record needs one")
    if all(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):  # SVIT groups
        groups = [t["content"] for t in turns]
        ids = [f"{record_id}-{n}" for n in range(len(groups))] if len(groups) > 1 else [record_id]
    else:
        groups, ids = [turns], [record_id]
    images = _record_images(record, where, image_root, check_images, index)
    samples = []
    for sample_id, group in zip(ids, groups, strict=True):
        messages = _messages(group, where)
        markers = sum(str(m["content"]).count(MARKER) for m in messages)
        if not images and markers:
            raise DataError(f"{where}: {MARKER} marker but no image; add an image field or drop the marker")
        if len(images) > 1 and markers != len(images):
            raise DataError(
                f"{where}: {len(images)} images but {markers} {MARKER} marker(s); put one marker per image"
            )
        if "image" in record and len(images) == 1 and markers == 0:
            raise DataError(f"{where}: no {MARKER} marker in a human turn; add it to the first one")
        for message in messages:
            content = str(message["content"])
            if len(images) > 1 and MARKER in content:  # several images: parts say where each goes
                message["content"] = _with_image_parts(content)
            else:
                message["content"] = content.replace(MARKER, "").strip()
        answers = [text_of(m) for m in messages if m["role"] == "assistant"][-1:]
        image: Any = images if len(images) > 1 else (images[0] if images else None)
        samples.append(Sample(id=sample_id, image=image, messages=messages, answers=answers))
    return samples


def _record_images(
    record: dict, where: str, image_root: Path, check_images: bool, index: ImageIndex
) -> list[str]:
    if record.get("image") is not None:
        names = record["image"] if isinstance(record["image"], list) else [record["image"]]
        paths = [image_root / str(name) for name in names]
        if check_images:
            for path in paths:
                if not path.is_file():
                    raise DataError(f"{where}: image {path} does not exist; check image_folder")
        return [str(p) for p in paths]
    if record.get("image_id") is not None:
        found = index.find(record["image_id"])
        if found is None:
            raise DataError(
                f"{where}: no image named {record['image_id']}.jpg under {image_root}; "
                "set image_folder to the Visual Genome / COCO image folder"
            )
        return [str(found)]
    return []  # a text-only record


def _records(file: Path) -> list[Any]:
    text = file.read_text()
    try:
        if file.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(records, dict):
        lists = [key for key, value in records.items() if isinstance(value, list)]
        hint = (
            f"; the records look to be under {lists[0]!r}: save that list as the file"
            if len(lists) == 1
            else ""
        )
        raise DataError(
            f"{file} holds a JSON object (keys: {', '.join(list(records)[:5])}), not a list of "
            f"LLaVA records{hint}"
        )
    if not isinstance(records, list):
        raise DataError(f"{file} holds a JSON {type(records).__name__}, not a list of LLaVA records")
    return records


def _conversation_file(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in (f"{split}.json", f"{split}.jsonl"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"no {split}.json or {split}.jsonl in {path}; point data.path at the JSON file")
    raise DataError(f"LLaVA JSON file {path} does not exist")


@register_source("llava_json", default_metric="exact_match")
def load_llava_json(
    split: str = "train",
    path: str | None = None,
    image_folder: str | None = None,
    check_images: bool = True,
) -> list[Sample]:
    """`path`: the JSON (a list) or JSONL file, or a folder of `{split}.json`; images are relative to
    `image_folder` (default: the file's folder)."""
    if path is None:
        raise DataError("the llava_json source needs a path to the conversations JSON")
    file = _conversation_file(Path(path), split)
    root = Path(image_folder) if image_folder else file.parent
    if image_folder and not root.is_dir():
        raise DataError(f"image_folder {root} is not a folder; set it to where the images are")
    index = ImageIndex(root)
    samples = []
    for number, record in enumerate(_records(file)):
        samples.extend(conversation_samples(record, f"{file} record {number}", root, check_images, index))
    return samples
