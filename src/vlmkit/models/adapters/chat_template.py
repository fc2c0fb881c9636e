"""Families whose tokenizer's chat template renders the conversation (LLaVA, Qwen2-VL).

The template writes one image placeholder; the adapter expands it to as many tokens as the tower
gives for that image, as the family's processor does, and labels each assistant turn only.
"""

from __future__ import annotations

from typing import Any

from vlmkit.data.sample import Message, Sample
from vlmkit.errors import SampleError
from vlmkit.models.adapters.hf_base import (
    HFVisionAdapter,
    Row,
    assert_label_invariants,
    encode_conversation,
    expand_token,
)


def chat_messages(messages: list[Message], with_image: bool = True) -> list[dict[str, Any]]:
    """Content-part messages; the image goes first in the first user turn (Qwen's own examples)."""
    out: list[dict[str, Any]] = []
    image_placed = not with_image
    for message in messages:
        parts: list[dict[str, Any]] = []
        if message["role"] == "user" and not image_placed:
            parts.append({"type": "image"})
            image_placed = True
        parts.append({"type": "text", "text": message["content"]})
        out.append({"role": message["role"], "content": parts})
    return out


class ChatTemplateAdapter(HFVisionAdapter):
    """Set in `configure`: `image_token_id`, `end_of_turn` (ids that end an assistant turn) and
    `unlabelled` (ids that never carry a label)."""

    image_token_id: int
    end_of_turn: set[int]
    unlabelled: set[int]

    def image_token_count_of(self, images: dict[str, Any]) -> int:
        """How many placeholder tokens the processed image fills."""
        raise NotImplementedError

    def row(self, ids: list[int], labels: list[int] | None, images: dict[str, Any], image_mask: Any) -> Row:
        return Row(ids, labels, {"pixel_values": images["pixel_values"]})

    def stop_token_ids(self) -> list[int]:
        return sorted(set(super().stop_token_ids()) | self.end_of_turn)

    def encode_one(self, sample: Sample, train: bool) -> Row:
        messages = chat_messages(sample.messages if train else sample.prompt_messages())
        try:
            ids, labels = encode_conversation(self.tokenizer, messages, train, self.end_of_turn)
        except ValueError as exc:
            raise SampleError(sample.id, str(exc)) from None
        images = self.image_tensors(sample)
        count = self.image_token_count_of(images)
        ids, labels, image_mask = expand_token(ids, labels, self.image_token_id, [count], sample.id)
        if labels is not None:
            assert_label_invariants(ids, labels, self.unlabelled, sample.id)
        return self.row(ids, labels, images, image_mask)
