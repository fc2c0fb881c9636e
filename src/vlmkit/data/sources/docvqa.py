"""DocVQA in the HuggingFaceM4/DocumentVQA layout (parquet / arrow / save_to_disk, or the hub id).

Columns: question, answers (list of strings; the first is the training target), image, and
optionally questionId, question_types, docId, ucsf_document_id, ucsf_document_page_no (-> meta).
Also the lmms-lab/DocVQA snapshot (DocVQA/ beside InfographicVQA/). Scored with ANLS. The test split ships without answers: its samples have none.
"""

from __future__ import annotations

from vlmkit.data.sample import Sample
from vlmkit.data.sources import SHORT_ANSWER, register_source
from vlmkit.data.sources.hf_tables import DatasetImage, open_table, require_columns, text_rows, where
from vlmkit.data.sources.vqav2 import vqa_sample

HUB_ID = "HuggingFaceM4/DocumentVQA"
NEEDED = ("question", "answers", "image")
META = ("questionId", "question_types", "docId", "ucsf_document_id", "ucsf_document_page_no")


@register_source("docvqa", default_metric="anls", prompt_suffix=SHORT_ANSWER, max_new_tokens=32)
def load_docvqa(split: str = "train", path: str | None = None, system: str | None = None) -> list[Sample]:
    # lmms-lab/DocVQA holds DocVQA/ and InfographicVQA/ side by side: read DocVQA/.
    table = open_table("docvqa", path, split, HUB_ID, subset="DocVQA")
    require_columns(table, "docvqa", NEEDED, where(path, HUB_ID))
    table, rows = text_rows(table, "image")
    samples = []
    for index, row in enumerate(rows):
        answers = [str(a) for a in row["answers"] or []]
        question_id = row.get("questionId", index)
        samples.append(
            vqa_sample(
                f"docvqa-{split}-{question_id}",
                DatasetImage(table, index, "image", f"docvqa:{split}:row{index}"),
                row["question"],
                answers[0] if answers else None,
                answers,
                {k: row[k] for k in META if row.get(k) is not None},
                system,
            )
        )
    return samples
