"""ChartQA in the HuggingFaceM4/ChartQA layout (parquet / arrow / save_to_disk, or the hub id).

Columns: query, label (a one-item list or a string), image, and human_or_machine (0/"human": the
human-written questions; 1/"machine": the augmented, generated ones). The `subset` option picks
`human`, `augmented` or `all` (default). Scored with relaxed accuracy (5% numeric tolerance).

Also the GitHub release (`ChartQA Dataset/{train,val,test}/{split}_human.json`,
`{split}_augmented.json` with imgname/query/label, images in `{split}/png/`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.data.sample import Sample
from vlmkit.data.sources import SHORT_ANSWER, register_source
from vlmkit.data.sources.hf_tables import (
    DatasetImage,
    label_name,
    open_table,
    require_columns,
    text_rows,
    where,
)
from vlmkit.data.sources.vqav2 import vqa_sample
from vlmkit.errors import DataError

HUB_ID = "HuggingFaceM4/ChartQA"
NEEDED = ("query", "label", "image")
SUBSETS = {"human": ("human", 0), "augmented": ("machine", "augmented", 1)}


def labels_of(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


@register_source("chartqa", default_metric="relaxed_accuracy", prompt_suffix=SHORT_ANSWER, max_new_tokens=16)
def load_chartqa(
    split: str = "train", path: str | None = None, subset: str = "all", system: str | None = None
) -> list[Sample]:
    if subset not in ("all", *SUBSETS):
        raise DataError(f"chartqa subset {subset!r} is not one of all, human, augmented")
    if path and (folder := github_folder(Path(path), split)) is not None:
        return load_github(folder, split, subset, system)
    table = open_table("chartqa", path, split, HUB_ID)
    needed = NEEDED + (("human_or_machine",) if subset != "all" else ())
    require_columns(table, "chartqa", needed, where(path, HUB_ID))
    table, rows = text_rows(table, "image")
    samples = []
    for index, row in enumerate(rows):
        origin = label_name(table, "human_or_machine", row.get("human_or_machine"))
        if subset != "all" and origin not in SUBSETS[subset]:
            continue
        answers = labels_of(row["label"])
        meta = (
            {"human_or_machine": "human" if origin in SUBSETS["human"] else "augmented"}
            if origin is not None
            else {}
        )
        samples.append(
            vqa_sample(
                f"chartqa-{split}-{index}",
                DatasetImage(table, index, "image", f"chartqa:{split}:row{index}"),
                row["query"],
                answers[0] if answers else None,
                answers,
                meta,
                system,
            )
        )
    return samples


GITHUB_SPLITS = {"validation": "val", "val": "val", "train": "train", "test": "test"}


def github_folder(root: Path, split: str) -> Path | None:
    """`root/{split}` (or root itself) when it holds the GitHub release's `{split}_human.json`."""
    name = GITHUB_SPLITS.get(split, split)
    for folder in (root / name, root):
        if (folder / f"{name}_human.json").is_file() or (folder / f"{name}_augmented.json").is_file():
            return folder
    return None


def load_github(folder: Path, split: str, subset: str, system: str | None) -> list[Sample]:
    name = GITHUB_SPLITS.get(split, split)
    samples = []
    for origin in ("human", "augmented"):
        file = folder / f"{name}_{origin}.json"
        if subset not in ("all", origin):
            continue
        if not file.is_file():
            raise DataError(f"chartqa: {file} does not exist; the {origin} questions are read from it")
        try:
            records = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"chartqa: {file} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"chartqa: {file} holds a JSON {type(records).__name__}, not a list of questions")
        for index, record in enumerate(records):
            if not isinstance(record, dict) or not {"imgname", "query", "label"} <= set(record):
                raise DataError(f"chartqa: {file} record {index} lacks imgname, query or label")
            answers = labels_of(record["label"])
            samples.append(
                vqa_sample(
                    f"chartqa-{split}-{origin}-{index}",
                    str(folder / "png" / record["imgname"]),
                    record["query"],
                    answers[0] if answers else None,
                    answers,
                    {"human_or_machine": origin, "imgname": record["imgname"]},
                    system,
                )
            )
    return samples
