"""VQAv2, in the Hugging Face `datasets` layout or the original JSON + COCO images layout.

Training target: `multiple_choice_answer` (the most common of the ten human answers); scoring uses
all ten answers (VQA accuracy: min(#humans who gave the answer / 3, 1)).

* HF layout: parquet / arrow files or a `save_to_disk` folder with columns question,
  multiple_choice_answer, image, and optionally answers (ten, as dicts or strings), question_type,
  answer_type, question_id, image_id (kept in Sample.meta).
* Original layout: `v2_OpenEnded_mscoco_{split}_questions.json`, `v2_mscoco_{split}_annotations.json`
  and images `{split}/COCO_{split}_{image_id:012d}.jpg` (split e.g. train2014, val2014; `train` and
  `validation` are accepted). Test splits have no annotations: their samples have no answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.data.sample import Message, Sample
from vlmkit.data.sources import SHORT_ANSWER, register_source
from vlmkit.data.sources.hf_tables import DatasetImage, open_table, require_columns, text_rows, where
from vlmkit.errors import DataError

HUB_ID = "HuggingFaceM4/VQAv2"
NEEDED = ("question", "multiple_choice_answer", "image")
META = ("question_type", "answer_type", "question_id", "image_id")
# Original layout: the split names of the JSON files and COCO image folders.
ORIGINAL_SPLITS = {"train": "train2014", "validation": "val2014", "val": "val2014", "test": "test2015"}


def answer_texts(answers: Any) -> list[str]:
    """The ten human answers, whether stored as dicts ({"answer": ...}) or plain strings."""
    if not answers:
        return []
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


def vqa_sample(
    sample_id: str,
    image: Any,
    question: str,
    target: str | None,
    answers: list[str],
    meta: dict,
    system: str | None = None,
) -> Sample:
    """A question, its training target (if any) and every reference answer; `system` opens the chat."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    if target:
        messages.append({"role": "assistant", "content": target})
    references = answers or ([target] if target else [])
    return Sample(id=sample_id, image=image, messages=messages, answers=references, meta=meta)


def original_files(root: Path, split: str) -> tuple[Path, Path, str] | None:
    name = ORIGINAL_SPLITS.get(split, split)
    questions = root / f"v2_OpenEnded_mscoco_{name}_questions.json"
    return (questions, root / f"v2_mscoco_{name}_annotations.json", name) if questions.is_file() else None


def coco_image(root: Path, name: str, image_id: int, image_folder: Path | None = None) -> Path:
    """COCO's file for `image_id`: under `image_folder` (the split's folder or its parent) when
    given, else beside the JSON (`{split}/` or `images/{split}/`)."""
    folder = "test2015" if name.startswith("test") else name  # test-dev questions use test2015 images
    file = f"COCO_{folder}_{image_id:012d}.jpg"
    bases = (
        (image_folder / folder, image_folder) if image_folder else (root / folder, root / "images" / folder)
    )
    for base in bases:
        if (base / file).is_file():
            return base / file
    for base in bases:
        if base.is_dir():
            return base / file
    return bases[0] / file


def _json_list(file: Path, key: str) -> list[dict[str, Any]]:
    """`{key: [...]}` from a VQAv2 JSON file, or a one-line error naming the file and the fix."""
    try:
        content = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"vqav2: {file} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        found = (
            f"a JSON object with keys {', '.join(list(content)[:6])}"
            if isinstance(content, dict)
            else f"a JSON {type(content).__name__}"
        )
        raise DataError(f'vqav2: {file} is {found}; the official VQAv2 file is an object with a "{key}" list')
    for number, item in enumerate(content[key]):
        if not isinstance(item, dict) or "question_id" not in item:
            raise DataError(f'vqav2: {file} {key}[{number}] is not an object with a "question_id"')
    return content[key]


def load_original(
    root: Path,
    split: str,
    files: tuple[Path, Path, str],
    system: str | None,
    image_folder: Path | None = None,
) -> list[Sample]:
    questions_file, annotations_file, name = files
    questions = _json_list(questions_file, "questions")
    annotations = (
        {a["question_id"]: a for a in _json_list(annotations_file, "annotations")}
        if annotations_file.is_file()
        else {}
    )
    samples = []
    for number, q in enumerate(questions):
        missing = [k for k in ("question", "image_id") if k not in q]
        if missing:
            raise DataError(
                f"vqav2: {questions_file} question {number} (id {q['question_id']}) lacks {', '.join(missing)}"
            )
        annotation = annotations.get(q["question_id"], {})
        meta = {"question_id": q["question_id"], "image_id": q["image_id"]}
        meta.update({k: annotation[k] for k in ("question_type", "answer_type") if k in annotation})
        samples.append(
            vqa_sample(
                f"vqav2-{name}-{q['question_id']}",
                str(coco_image(root, name, q["image_id"], image_folder)),
                q["question"],
                annotation.get("multiple_choice_answer"),
                answer_texts(annotation.get("answers")),
                meta,
                system,
            )
        )
    return samples


@register_source("vqav2", default_metric="vqa_accuracy", prompt_suffix=SHORT_ANSWER, max_new_tokens=16)
def load_vqav2(
    split: str = "train",
    path: str | None = None,
    system: str | None = None,
    image_folder: str | None = None,
) -> list[Sample]:
    """`path`: a local folder in either layout, or a hub id (default HuggingFaceM4/VQAv2, online).

    `system` (option): a system prompt put before each question (chat-template models only).
    `image_folder` (option, original layout): where COCO's `train2014/`, `val2014/`, `test2015/`
    are (or one of them), when not beside the JSON files.
    """
    if path and Path(path).is_dir() and (files := original_files(Path(path), split)):
        folder = Path(image_folder) if image_folder else None
        if folder is not None and not folder.is_dir():
            raise DataError(f"vqav2: image_folder {folder} is not a folder; set it to COCO's image folder")
        return load_original(Path(path), split, files, system, folder)
    if image_folder:
        raise DataError(
            "vqav2: image_folder applies to the original JSON layout only (Hugging Face layouts hold "
            f"their images); no v2_OpenEnded_mscoco_*{split}* questions file found in {path}"
        )
    table = open_table("vqav2", path, split, HUB_ID)
    require_columns(table, "vqav2", NEEDED, where(path, HUB_ID))
    table, rows = text_rows(table, "image")
    samples = []
    for index, row in enumerate(rows):
        meta = {k: row[k] for k in META if row.get(k) is not None}
        meta["multiple_choice_answer"] = row["multiple_choice_answer"]
        image_id = row.get("image_id")
        key = f"vqav2:{split}:image{image_id}" if image_id is not None else f"vqav2:{split}:row{index}"
        question_id = row.get("question_id", index)
        samples.append(
            vqa_sample(
                f"vqav2-{split}-{question_id}",
                DatasetImage(table, index, "image", key),
                row["question"],
                row["multiple_choice_answer"],
                answer_texts(row.get("answers")),
                meta,
                system,
            )
        )
    return samples
