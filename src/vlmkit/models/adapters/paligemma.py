"""PaliGemma and PaliGemma 2: the processor's prefix/suffix convention, not a chat template.

Input = `<image>` x N, `<bos>`, prefix + question, `\\n` (token_type_ids 0: the prefix, attended
bidirectionally), then the answer + `<eos>` (token_type_ids 1: the causal suffix); labels are the
suffix only. `PaliGemmaProcessor(text=..., images=..., suffix=...)` builds exactly that, and pads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from vlmkit.data.sample import Sample, text_of
from vlmkit.errors import SampleError
from vlmkit.models.adapters.base import Batch
from vlmkit.models.adapters.hf_generic import HFGenericAdapter, assert_label_invariants
from vlmkit.models.chat_encoding import IGNORE_INDEX

logger = logging.getLogger(__name__)


class PaliGemmaAdapter(HFGenericAdapter):
    """Question = the sample's first user turn (the last one when generating), answer = the assistant
    turn after it; the prompt is `prompt_prefix + question` ("answer en " by default, PaliGemma's
    VQA task prefix)."""

    # One question per row: merged turns would lose all but the first, and cannot share the image
    # anyway (PaliGemma's image tokens attend to the question, so they differ per question).
    trains_merged_turns = False
    warned_multi_turn = False

    def configure(self) -> None:
        self.image_token_id = self.model.config.image_token_index

    def images_per_sample(self) -> tuple[int, int | None]:
        return 1, 1  # its prompt is the image tokens, then the prefix and question

    def prompt_and_answer(self, sample: Sample, train: bool) -> tuple[str, str | None]:
        messages = sample.messages if train else sample.prompt_messages()
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise SampleError(sample.id, "has no user turn (the question)")
        at = users[0] if train else users[-1]
        if train and len(users) > 1 and not self.warned_multi_turn:
            logger.warning(
                "PaliGemma trains the first question of a conversation only (sample %s has %d); "
                "split conversations into one sample per question to train the others",
                sample.id,
                len(users),
            )
            self.warned_multi_turn = True
        answer = None
        if train:
            answer = next((text_of(m) for m in messages[at + 1 :] if m["role"] == "assistant"), None)
            if answer is None:
                raise SampleError(sample.id, "has no assistant turn after the question")
        return f"{self.settings['prompt_prefix']}{text_of(messages[at])}", answer

    def encode(self, samples: Sequence[Sample], *, train: bool = True) -> Batch:
        prompts, answers, images = [], [], []
        for sample in samples:
            prompt, answer = self.prompt_and_answer(sample, train)
            loaded = self.load_images(sample)
            if not loaded:
                raise SampleError(sample.id, "has no image; this model family needs one per sample")
            prompts.append("<image>" * len(loaded) + prompt)
            answers.append(answer)
            images.append(loaded)
        kwargs: dict[str, Any] = {
            "text": prompts,
            "images": images,
            "padding": True,
            "padding_side": "right" if train else "left",
            "return_tensors": "pt",
        }
        if train:
            kwargs["suffix"] = answers
        batch: Batch = dict(self.processor(**kwargs))
        if not train:
            batch.pop("labels", None)
        for row, sample in enumerate(samples):
            length = int(batch["attention_mask"][row].sum())
            self.check_length(sample, length)
            if train:
                ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
                forbidden = {self.image_token_id, self.tokenizer.pad_token_id}
                kept = [
                    (i, label)
                    for i, label, m in zip(ids, labels, batch["attention_mask"][row], strict=True)
                    if m
                ]
                assert_label_invariants([i for i, _ in kept], [lab for _, lab in kept], forbidden, sample.id)
                assert labels[len(kept) - 1] == self.tokenizer.eos_token_id, "the suffix must end with EOS"
                batch["labels"][row][batch["attention_mask"][row] == 0] = IGNORE_INDEX
        dtype = next((p.dtype for p in self.model.parameters() if p.dtype.is_floating_point), None)
        if dtype is not None:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return batch
