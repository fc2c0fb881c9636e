"""Single questions about one image, merged into multi-turn conversations for training.

A VQA source yields one sample per question, so a model pays for the image tokens and the chat
scaffolding once per question. Merged into a conversation (as LLaVA's training data is), the
image is encoded and attended to once for several answers, each of which carries loss.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from vlmkit.data.sample import Message, Sample

#: `meta` flag of a merged conversation: its turns are separate questions, so an adapter that can
#: (vlmkit's own VLM) lets each turn see the image but not the other turns' answers.
INDEPENDENT_TURNS = "independent_turns"


def merge_turns(samples: list[Sample], turns: int, seed: int = 0) -> list[Sample]:
    """Group single-turn samples by image into conversations of at most `turns` questions.

    An image's questions are shuffled with `seed` and split into near-equal chunks (11 questions
    with `turns=5` become 4 + 4 + 3), so conversations in a batch have similar lengths. Samples
    that are not a single question and answer about an image file pass through unchanged;
    nothing is dropped.
    """
    if turns < 1:
        raise ValueError(f"turns must be at least 1, not {turns}")
    by_image: dict[str, list[Sample]] = defaultdict(list)
    order: list[str | Sample] = []  # each image's first position, or an unmergeable sample
    for sample in samples:
        key = _image_key(sample)
        if key is None:
            order.append(sample)
            continue
        if key not in by_image:
            order.append(key)
        by_image[key].append(sample)
    rng = random.Random(seed)
    merged: list[Sample] = []
    for entry in order:
        if isinstance(entry, Sample):
            merged.append(entry)
            continue
        group = by_image[entry]
        rng.shuffle(group)
        chunks = -(-len(group) // turns)
        merged.extend(_conversation(group[i::chunks]) for i in range(chunks))
    return merged


def _image_key(sample: Sample) -> str | None:
    single_turn = [m["role"] for m in sample.messages] == ["user", "assistant"]
    if not single_turn or not isinstance(sample.image, (str, Path)):
        return None
    return str(sample.image)


def _conversation(group: list[Sample]) -> Sample:
    if len(group) == 1:
        return group[0]
    messages: list[Message] = [dict(m) for s in group for m in s.messages]  # type: ignore[misc]
    shared = {k: v for k, v in group[0].meta.items() if all(s.meta.get(k) == v for s in group[1:])}
    return Sample(
        id="+".join(s.id for s in group),
        image=group[0].image,
        messages=messages,
        answers=list(group[-1].answers),  # the reference for the last question, the one a prompt ends on
        meta={**shared, "turns": len(group), INDEPENDENT_TURNS: True},
    )
