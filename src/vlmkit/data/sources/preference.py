"""Preference pairs for DPO: an image, a prompt, and a `chosen` and a `rejected` answer.

Layouts read (one record per pair; `path` is a file or a folder):
- JSONL / JSON list: `{"id", "image", "question" | "prompt" | "messages" | "conversations",
  "chosen", "rejected"}`; images are relative to the file (or `image_folder`). `image` may be a list.
- LLaVA-style JSON: `conversations` with `from: human|gpt` turns (the `<image>` marker is removed);
  the conversation ends on a human turn, or its last gpt turn is dropped in favour of chosen/rejected.
- Hugging Face `datasets` (parquet / arrow / save_to_disk): RLAIF-V's columns `image, question,
  chosen, rejected`, or TRL's vision preference layout `images, prompt, chosen, rejected`, where
  prompt / chosen / rejected may be strings or conversations (lists of `{role, content}`).

Each pair becomes one Sample: the prompt turns plus `chosen` as the assistant turn (so SFT on the
same source trains on the chosen answers), with `meta["rejected"]` the rejected answer. A record
without `chosen` or `rejected`, or with both the same, is a one-line error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.data.sample import Message, Sample, text_of
from vlmkit.data.sources import register_source
from vlmkit.data.sources.hf_tables import DatasetImage
from vlmkit.errors import DataError

REJECTED = "rejected"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MARKER = "<image>"
IMAGE_COLUMNS = ("image", "images")


def rejected_of(sample: Sample) -> str:
    """The rejected answer of a preference Sample; a one-line error for a sample without one."""
    rejected = sample.meta.get(REJECTED)
    if not isinstance(rejected, str):
        raise DataError(
            f"sample {sample.id!r} has no rejected answer: objective: dpo needs preference pairs "
            "(data source `preference` with chosen and rejected answers)"
        )
    return rejected


def with_answer(sample: Sample, answer: str) -> Sample:
    """The sample's prompt turns followed by `answer` as the assistant turn."""
    messages: list[Message] = [*sample.prompt_messages(), {"role": "assistant", "content": answer}]
    return Sample(
        id=sample.id, image=sample.image, messages=messages, answers=sample.answers, meta=sample.meta
    )


def _answer_text(value: Any, where: str, key: str) -> str:
    """chosen / rejected as a string: plain, or the assistant turn of a TRL conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        turns = [m for m in value if ROLES.get(str(m.get("role", m.get("from", ""))).lower()) == "assistant"]
        if turns:
            last = turns[-1]
            content = last.get("content", last.get("value", ""))
            return text_of({"role": "assistant", "content": content})  # type: ignore[typeddict-item]
    raise DataError(
        f"{where}: {key!r} must be an answer string or a list of messages with an assistant turn "
        f"(found {type(value).__name__})"
    )


def _turns(value: Any, where: str) -> list[Message]:
    """Prompt turns from a string or a list of `{role|from, content|value}` messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value.replace(MARKER, "").strip()}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: the prompt must be a string or a non-empty list of messages")
    messages: list[Message] = []
    for turn in value:
        if not isinstance(turn, dict):
            raise DataError(
                f"{where}: a prompt turn is {type(turn).__name__}, not a {{role, content}} mapping"
            )
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        if role is None:
            raise DataError(
                f"{where}: unknown speaker {turn.get('role', turn.get('from'))!r}; use user/assistant"
            )
        content = turn.get("content", turn.get("value", ""))
        if isinstance(content, str):
            content = content.replace(MARKER, "").strip()
        elif isinstance(content, list):  # content parts; Arrow fills absent keys with None
            content = [
                {"type": "image"}
                if part.get("type") == "image"
                else {"type": "text", "text": part.get("text") or ""}
                for part in content
            ]
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the answer that chosen / rejected replace
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end on a user turn")
    return messages


def preference_sample(record: dict[str, Any], where: str, image: Any) -> Sample:
    """One pair as a Sample (validated: both answers present and different)."""
    sample_id = str(record.get("id", where))
    where = f"{where} (id {sample_id!r})" if "id" in record else where
    for key in ("chosen", REJECTED):
        if record.get(key) is None:
            raise DataError(
                f"{where}: no {key!r} answer; every preference record needs both 'chosen' and 'rejected'"
            )
    chosen = _answer_text(record["chosen"], where, "chosen").strip()
    rejected = _answer_text(record[REJECTED], where, REJECTED).strip()
    if chosen == rejected:
        raise DataError(
            f"{where}: chosen and rejected are the same answer ({chosen!r}), which teaches nothing; "
            "fix or remove the record"
        )
    prompt = next(
        (record[k] for k in ("prompt", "messages", "conversations", "question") if record.get(k) is not None),
        None,
    )
    if prompt is None:
        raise DataError(f"{where}: no prompt; give 'question', 'prompt', 'messages' or 'conversations'")
    messages = [*_turns(prompt, where), {"role": "assistant", "content": chosen}]
    answers = [str(a) for a in record.get("answers") or [chosen]]
    meta = {k: v for k, v in dict(record.get("meta") or {}).items()}
    meta[REJECTED] = rejected
    return Sample(id=sample_id, image=image, messages=messages, answers=answers, meta=meta)


def _file_records(file: Path) -> list[tuple[str, dict[str, Any]]]:
    from vlmkit.data.sources.jsonl import jsonl_records

    if file.suffix == ".jsonl":
        records = list(jsonl_records(file))
    else:
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{file} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{file} must hold a list of preference records")
        records = [(f"{file} record {i}", r) for i, r in enumerate(data)]
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(
                f"{where} is not a JSON object; each record needs image, prompt, chosen, rejected"
            )
    return records


def _local_image(value: Any, root: Path, where: str, check: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_local_image(v, root, where, check) for v in value]
    path = root / str(value)
    if check and not path.is_file():
        raise DataError(f"{where}: image {path} does not exist; check image_folder")
    return str(path.resolve())


@register_source("preference", default_metric="exact_match")
def load_preference(
    split: str = "train",
    path: str | None = None,
    image_folder: str | None = None,
    check_images: bool = True,
) -> list[Sample]:
    """`path`: a .jsonl / .json file, a folder with `{split}.jsonl` / `{split}.json`, or a `datasets` folder."""
    if path is None:
        raise DataError(
            "the preference source needs a path (data: {source: preference, path: FILE_OR_FOLDER})"
        )
    root = Path(path)
    file = root
    if root.is_dir():
        file = next(
            (root / f"{split}.{ext}" for ext in ("jsonl", "json") if (root / f"{split}.{ext}").is_file()),
            root,
        )
    if file.is_file():
        images = Path(image_folder) if image_folder else file.parent
        samples = []
        for where, record in _file_records(file):
            if not any(k in record for k in IMAGE_COLUMNS):
                raise DataError(f"{where}: no 'image' field; give an image path (or null for text-only)")
            value = record.get("image", record.get("images"))
            samples.append(preference_sample(record, where, _local_image(value, images, where, check_images)))
        return samples
    return _table_samples(path, split)


def _table_samples(path: str, split: str) -> list[Sample]:
    from vlmkit.data.sources.hf_tables import open_table, require_columns, text_rows

    table = open_table("preference", path, split, default_hub_id=path)
    column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if column is None:
        raise DataError(
            f"preference data at {path} has no image column (image or images); found {', '.join(table.column_names)}"
        )
    require_columns(table, "preference", ("chosen", REJECTED), path)
    table, rows = text_rows(table, column)
    samples = []
    for index, row in enumerate(rows):
        key = f"{path}:{split}:{index}"
        if column == "images":  # TRL's layout: a list of images per row
            count = len(table[index][column] or [])
            image: Any = [ListImage(table, index, column, f"{key}/{n}", n) for n in range(count)] or None
        else:
            image = DatasetImage(table, index, column, key)
        row.setdefault("id", row.pop("idx", None) or f"{split}-{index}")
        samples.append(preference_sample(row, key, image))
    return samples


class ListImage(DatasetImage):
    """Item `n` of a `datasets` row's list of images (TRL's `images` column), decoded on use."""

    def __init__(self, table: Any, index: int, column: str, key: str, n: int) -> None:
        super().__init__(table, index, column, key)
        self.n = n

    def read(self) -> Any:
        value = self.table[self.index][self.column][self.n]
        if isinstance(value, dict):
            return value.get("bytes") or value.get("path")
        return value
