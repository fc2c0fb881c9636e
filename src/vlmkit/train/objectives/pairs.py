"""Preference pairs from a model's own mistakes: its wrong answer (rejected) against the reference.

`python -m vlmkit.train.objectives.pairs MODEL OUT.jsonl [--source easyvqa --split train]
[--beams 4 | --samples 4 --temperature 2]` writes a JSONL that the `preference` source reads; the
easy-VQA DPO recipe (configs/easyvqa_dpo.yaml) trains on it. Only samples with an image path (or
none) can be written.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
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
    num_samples: int = 0,
    temperature: float = 1.0,
    num_beams: int = 0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One record per sample the model answers wrongly (`metric` below 1): greedy; with
    `num_samples` > 0 the most frequent wrong answer among the greedy one and that many sampled
    at `temperature`; with `num_beams` k the wrong answer the model ranks highest among its k most
    likely answers (beam search, ranked by summed log-probability).

    Greedy mistakes are a biased set: on easy-VQA, DPO on them alone taught "flip the answer" and
    test accuracy fell from 91% to 26-37% (docs/recipes.md). Sampling also finds the wrong answers
    a model gives some weight to on questions it answers right; ranking finds one for (nearly)
    every question, the model's own strongest rival to the reference, so the pairs cover the data.
    """
    if num_beams and num_samples:
        raise ValueError("choose num_beams (ranked wrong answers) or num_samples (sampled), not both")
    if num_beams == 1:
        raise ValueError("num_beams 1 ranks only the greedy answer; use 0 for greedy or 2 or more")
    score = get_metric(metric)
    records = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        if num_beams:
            answers = ranked_answers(adapter, chunk, num_beams, max_new_tokens)
        else:
            answers = [[answer] for answer in adapter.generate(chunk, max_new_tokens=max_new_tokens)]
        for draw in range(num_samples):
            sampled = adapter.generate(
                chunk,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                seed=seed * 1_000_003 + start * 131 + draw,
            )
            for options, answer in zip(answers, sampled, strict=True):
                options.append(answer)
        for sample, options in zip(chunk, answers, strict=True):
            if not sample.answers:
                continue
            wrong = [
                a
                for a in options
                if score(a, sample.answers) < 1.0 and a.strip() != sample.answers[0].strip()
            ]
            if not wrong:
                continue  # right every time (a partial-credit metric may disagree with the string)
            if sample.image is not None and not isinstance(sample.image, str):
                raise DataError(f"sample {sample.id!r}: its image is not a file path; pairs store paths")
            rejected = wrong[0] if num_beams else Counter(wrong).most_common(1)[0][0]
            records.append(
                {
                    "id": sample.id,
                    "image": sample.image,
                    "question": sample.question,
                    "chosen": sample.answers[0],
                    "rejected": rejected,
                    "answers": sample.answers,
                }
            )
    logger.info("%d of %d samples have a wrong answer: %d pairs", len(records), len(samples), len(records))
    return records


def ranked_answers(
    adapter: ModelAdapter, samples: Sequence[Sample], num_beams: int, max_new_tokens: int
) -> list[list[str]]:
    """Each sample's `num_beams` most likely answers, most likely first. Length penalty 0 ranks by
    the answer's summed log-probability, the quantity DPO compares."""
    options = {
        "num_beams": num_beams,
        "num_return_sequences": num_beams,
        "length_penalty": 0.0,
        "early_stopping": True,
    }
    flat = adapter.generate(samples, max_new_tokens=max_new_tokens, generation_options=options)
    return [flat[i * num_beams : (i + 1) * num_beams] for i in range(len(samples))]


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
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=0, help="sampled answers per question, besides greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--beams", type=int, default=0, help="rank this many answers; reject the best wrong one"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.beams and args.samples:
        parser.error("--beams ranks answers and --samples samples them; choose one")
    if args.beams == 1:
        parser.error("--beams 1 ranks only the greedy answer; leave it out for greedy, or give 2 or more")
    logging.basicConfig(level=logging.INFO)
    records = mistake_pairs(
        load_adapter(args.model),
        load_samples({"source": args.source, "split": args.split}),
        metric=args.metric,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_samples=args.samples,
        temperature=args.temperature,
        num_beams=args.beams,
        seed=args.seed,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
