"""LLaVA (transformers' `LlavaForConditionalGeneration`): the tokenizer's chat template, one `<image>`.

The template's `<image>` is expanded to the tower's number of patch features (minus CLS under the
"default" feature strategy), as `LlavaProcessor` does. Labels cover assistant turns only; LLaVA-1.5's
template ends a turn with a space rather than EOS, so EOS is appended to each turn (see
`encode_conversation`) and generation stops on it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vlmkit.models.adapters.chat_template import ChatTemplateAdapter, chat_messages
from vlmkit.models.adapters.hf_base import template_end_of_turn


class LlavaAdapter(ChatTemplateAdapter):
    model_types = ("llava",)
    model_classes: ClassVar[dict[str, str]] = {"llava": "LlavaForConditionalGeneration"}

    def configure(self) -> None:
        config = self.model.config
        self.image_token_id = config.image_token_index
        self.unlabelled = {self.image_token_id}
        self.end_of_turn = template_end_of_turn(self.tokenizer, chat_messages)
        processor = self.processor
        self.patch_size = getattr(processor, "patch_size", None) or config.vision_config.patch_size
        self.strategy = (
            getattr(processor, "vision_feature_select_strategy", None)
            or config.vision_feature_select_strategy
        )
        self.additional_tokens = getattr(processor, "num_additional_image_tokens", None)
        if self.additional_tokens is None:  # CLIP-like towers prepend a class token
            self.additional_tokens = 1 if config.vision_config.model_type == "clip_vision_model" else 0

    def image_token_count_of(self, images: dict[str, Any]) -> int:
        """LlavaProcessor's count: patches + extra tokens, minus CLS under the "default" strategy."""
        height, width = (int(side) for side in images["pixel_values"].shape[-2:])
        count = (height // self.patch_size) * (width // self.patch_size) + self.additional_tokens
        return count - 1 if self.strategy == "default" else count
