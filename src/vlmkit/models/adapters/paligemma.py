"""PaliGemma and PaliGemma 2: the processor's prefix/suffix convention, not a chat template.

Input = `<image>` x N, `<bos>`, prefix + question, `\\n` (token_type_ids 0: the prefix, attended
bidirectionally), then the answer + `<eos>` (token_type_ids 1: the causal suffix). Labels are the
suffix only. This is exactly what `PaliGemmaProcessor(text=..., images=..., suffix=...)` builds; the
adapter builds it itself so it can pad right for training, left for generation, and cache pixels.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from vlmkit.data.sample import Sample
from vlmkit.errors import SampleError
from vlmkit.models.adapters.hf_base import HFVisionAdapter, Row, assert_label_invariants
from vlmkit.models.chat_encoding import IGNORE_INDEX

logger = logging.getLogger(__name__)


class PaliGemmaAdapter(HFVisionAdapter):
    """Question = the sample's first user turn (the last one when generating), answer = the assistant
    turn after it; the prompt is `prompt_prefix + question` ("answer en " by default, PaliGemma's
    VQA task prefix)."""

    model_types = ("paligemma",)
    model_classes: ClassVar[dict[str, str]] = {"paligemma": "PaliGemmaForConditionalGeneration"}
    options: ClassVar[dict[str, Any]] = {"prompt_prefix": "answer en "}
    # One question per row: merged turns would lose all but the first, and cannot share the image
    # anyway (PaliGemma's image tokens attend to the question, so they differ per question).
    trains_merged_turns = False
    warned_multi_turn = False

    def configure(self) -> None:
        self.image_token_id = self.model.config.image_token_index
        self.image_seq_length = int(
            getattr(self.image_processor, "image_seq_length", None)
            or self.model.config.text_config.num_image_tokens
        )

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
            answer = next((m["content"] for m in messages[at + 1 :] if m["role"] == "assistant"), None)
            if answer is None:
                raise SampleError(sample.id, "has no assistant turn after the question")
        return f"{self.settings['prompt_prefix']}{messages[at]['content']}", answer

    def encode_one(self, sample: Sample, train: bool) -> Row:
        prompt, answer = self.prompt_and_answer(sample, train)
        tokenizer = self.tokenizer
        prefix_text = f"{tokenizer.convert_ids_to_tokens(self.image_token_id)}" * self.image_seq_length
        prefix_text += f"{tokenizer.bos_token}{prompt}\n"
        prefix = list(tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
        suffix: list[int] = []
        if answer is not None:
            suffix = list(tokenizer(f"{answer}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"])
        ids = prefix + suffix
        token_type_ids = [0] * len(prefix) + [1] * len(suffix)
        labels = None
        if train:
            labels = [IGNORE_INDEX] * len(prefix) + suffix
            assert_label_invariants(ids, labels, {self.image_token_id, tokenizer.pad_token_id}, sample.id)
            assert suffix[-1] == tokenizer.eos_token_id, "the suffix must end with EOS"
        images = self.image_tensors(sample)
        return Row(ids, labels, {"pixel_values": images["pixel_values"]}, {"token_type_ids": token_type_ids})
