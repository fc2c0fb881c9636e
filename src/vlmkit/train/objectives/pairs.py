"""Preference pairs from a model's own mistakes: its wrong answer (rejected) against the reference.

`python -m vlmkit.train.objectives.pairs MODEL OUT.jsonl [--source easyvqa --split train]` writes a
JSONL that the `preference` source reads; the easy-VQA DPO recipe (configs/easyvqa_dpo.yaml)
trains on it. Only samples with an image path (or none) can be written.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.data.sample import Sample
from vlmkit.errors import DataError
from vlmkit.eval.metrics import get_metric
from vlmkit.models.adapters.base import ModelAdapter

logger = logging.getLogger(__name__)


def mistake_pairs(
    adapter: ModelAdapter,
    samples: Sequence[Sample],
    *,
    metric: str = "exact_match",
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> list[dict[str, Any]]:
    """One record per sample the model answers wrongly (greedy; `metric` below 1)."""
    score = get_metric(metric)
    records = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        answers = adapter.generate(chunk, max_new_tokens=max_new_tokens)
        for sample, answer in zip(chunk, answers, strict=True):
            if not sample.answers or score(answer, sample.answers) >= 1.0:
                continue
            if sample.image is not None and not isinstance(sample.image, str):
                raise DataError(f"sample {sample.id!r}: its image is not a file path; pairs store paths")
            if answer.strip() == sample.answers[0].strip():
                continue  # the metric disagrees with the string, e.g. a partial-credit metric
            records.append(
                {
                    "id": sample.id,
                    "image": sample.image,
                    "question": sample.question,
                    "chosen": sample.answers[0],
                    "rejected": answer,
                    "answers": sample.answers,
                }
            )
    logger.info("%d of %d answers were wrong: %d pairs", len(records), len(samples), len(records))
    return records


def main(argv: list[str] | None = None) -> None:
    from vlmkit.data.sources import load_samples
    from vlmkit.models.adapters import load_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", default="easyvqa")
    parser.add_argument("--split", default="train")
    parser.add_argument("--metric", default="exact_match")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    records = mistake_pairs(
        load_adapter(args.model),
        load_samples({"source": args.source, "split": args.split}),
        metric=args.metric,
        max_new_tokens=args.max_new_tokens,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
