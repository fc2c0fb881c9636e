"""Conversations in the Hugging Face `datasets` layouts that TRL and the_cauldron use.

From parquet / arrow files, a `save_to_disk` folder or a hub id (see `hf_tables.open_table`):

* TRL (e.g. HuggingFaceH4/llava-instruct-mix-vsft): an `images` column (a list of images per row)
  and `messages`: `[{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}]` (or
  plain-string content). The n-th image part shows the row's n-th image.
* the_cauldron (HuggingFaceM4/the_cauldron): `images` and `texts`: `[{"user", "assistant",
  "source"}]`, one question/answer pair per item; the images open the first user turn.

A row with no images is a text-only Sample. Images stay encoded in the Arrow table until used.
"""

from __future__ import annotations

from typing import Any

from vlmkit.data.images import LazyImage
from vlmkit.data.sample import Message, Sample, image_slots, text_of
from vlmkit.data.sources import register_source
from vlmkit.data.sources.hf_tables import open_table
from vlmkit.errors import DataError

ROLES = ("system", "user", "assistant")


class RowImage(LazyImage):
    """Image `position` of row `index`'s image list, read from the Arrow table without decoding it."""

    def __init__(self, table: Any, index: int, column: str, position: int | None, key: str) -> None:
        self.table = table
        self.index = index
        self.column = column
        self.position = position
        self.key = key

    def read(self) -> Any:
        value = self.table.data.column(self.column)[self.index].as_py()
        if self.position is not None:
            value = value[self.position]
        if isinstance(value, dict):  # datasets' Image storage: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                return value["path"]
        if isinstance(value, (bytes, str)) and value:
            return value
        raise DataError(f"image {self.key} has neither bytes nor a path")


def _content(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: content is {type(content).__name__}; use a string or content parts")
    parts: list[dict[str, str]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        else:
            raise DataError(f"{where}: content part {part!r} is neither an image nor a text part")
    return parts


def _trl_messages(turns: Any, where: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: messages is empty or not a list")
    messages: list[Message] = []
    for turn in turns:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise DataError(f"{where}: a turn has role {role!r}; use system, user or assistant")
        messages.append({"role": role, "content": _content(turn.get("content"), where)})
    return messages


def _cauldron_messages(pairs: Any, where: str) -> list[Message]:
    if not isinstance(pairs, list) or not pairs:
        raise DataError(f"{where}: texts is empty or not a list of user/assistant pairs")
    messages: list[Message] = []
    for pair in pairs:
        if not isinstance(pair, dict) or pair.get("user") is None or pair.get("assistant") is None:
            raise DataError(f"{where}: a texts item lacks user or assistant")
        messages.append({"role": "user", "content": str(pair["user"])})
        messages.append({"role": "assistant", "content": str(pair["assistant"])})
    return messages


def _check_turns(messages: list[Message], where: str) -> None:
    body = [m["role"] for m in messages if m["role"] != "system"]
    if not body or body != ["user", "assistant"] * (len(body) // 2):
        raise DataError(
            f"{where}: turns must alternate user, assistant, ... ending on assistant (found {' -> '.join(body)})"
        )


@register_source("hf_conversations", default_metric="exact_match", max_new_tokens=64)
def load_hf_conversations(split: str = "train", path: str | None = None) -> list[Sample]:
    """`path`: a folder (parquet / arrow / save_to_disk) or hub id in the TRL or the_cauldron layout."""
    if path is None:
        raise DataError("the hf_conversations source needs a path (a parquet/arrow/save_to_disk folder)")
    table = open_table("hf_conversations", path, split, path)
    columns = list(table.column_names)
    text_column = next((c for c in ("messages", "texts") if c in columns), None)
    image_column = next((c for c in ("images", "image") if c in columns), None)
    if text_column is None:
        raise DataError(
            f"hf_conversations data at {path} has neither a messages (TRL) nor a texts (the_cauldron) "
            f"column; found {', '.join(columns)}"
        )
    if table._indices is not None:  # a selected/shuffled view: RowImage reads the table by row
        table = table.flatten_indices()
    texts = table.data.column(text_column).to_pylist()
    images = table.data.column(image_column).to_pylist() if image_column else [None] * len(texts)
    samples = []
    for index, (turns, row_images) in enumerate(zip(texts, images, strict=True)):
        where = f"{path} {split} row {index}"
        if text_column == "messages":
            messages = _trl_messages(turns, where)
        else:
            messages = _cauldron_messages(turns, where)
        _check_turns(messages, where)
        key = f"hf_conversations:{path}:{split}:row{index}"
        if image_column == "image" or isinstance(row_images, dict):  # one image per row
            pictures: list[Any] = [RowImage(table, index, image_column, None, key)] if row_images else []
        else:
            pictures = [
                RowImage(table, index, image_column, n, f"{key}:{n}") for n in range(len(row_images or []))
            ]
        slots = sum(image_slots(m) for m in messages)
        if slots and slots != len(pictures):
            raise DataError(f"{where}: {slots} image part(s) but {len(pictures)} image(s); they must match")
        answers = [m for m in messages if m["role"] == "assistant"][-1:]
        samples.append(
            Sample(
                id=f"{split}-{index}",
                image=pictures if len(pictures) > 1 else (pictures[0] if pictures else None),
                messages=messages,
                answers=[text_of(m) for m in answers],
                meta={"source": turns[0].get("source")}
                if text_column == "texts" and turns[0].get("source")
                else {},
            )
        )
    return samples
