"""Qwen2-VL and Qwen2.5-VL: ChatML with an image content part, dynamic resolution.

The chat template renders the image as `<|vision_start|><|image_pad|><|vision_end|>`; the one
`<|image_pad|>` is expanded to (t*h*w / merge_size^2) copies after tokenizing, as the processor
does. Labels cover each assistant turn's text and its `<|im_end|>`, never vision, system or user
tokens; padding uses the pad token (`<|endoftext|>`) and is masked by attention and labels, so
even a tokenizer whose pad equals EOS keeps `<|im_end|>` labelled and the model learns to stop.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from vlmkit.data.images import image_size
from vlmkit.data.sample import Sample
from vlmkit.models.adapters.chat_template import ChatTemplateAdapter, chat_messages
from vlmkit.models.adapters.hf_base import Row, template_end_of_turn


class Qwen2VLAdapter(ChatTemplateAdapter):
    """`min_pixels` / `max_pixels` (adapter options) bound each image's resized area, so the number
    of vision tokens per image is between min_pixels/784 and max_pixels/784 at patch 14, merge 2."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    model_classes: ClassVar[dict[str, str]] = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    options: ClassVar[dict[str, Any]] = {"min_pixels": None, "max_pixels": None}
    image_combine = "cat"

    def configure(self) -> None:
        low, high = self.settings["min_pixels"], self.settings["max_pixels"]
        if low is not None or high is not None:
            size = dict(self.image_processor.size)
            size["shortest_edge"] = int(low) if low is not None else size["shortest_edge"]
            size["longest_edge"] = int(high) if high is not None else size["longest_edge"]
            if size["shortest_edge"] > size["longest_edge"]:
                from vlmkit.errors import ConfigError

                raise ConfigError(
                    f"min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}"
                )
            self.image_processor.size = type(self.image_processor.size)(**size)
            self._cache.clear()
        config = self.model.config
        self.image_token_id = config.image_token_id
        self.merge_size = int(getattr(self.image_processor, "merge_size", 2))
        self.end_of_turn = template_end_of_turn(self.tokenizer, chat_messages)
        vision_ids = {config.image_token_id, config.video_token_id, config.vision_start_token_id}
        self.unlabelled = vision_ids | {config.vision_end_token_id}

    def image_token_count_of(self, images: dict[str, Any]) -> int:
        return int(images["image_grid_thw"][0].prod()) // self.merge_size**2

    def image_tokens_of(self, sample: Sample) -> int:
        """From the image's size alone: the processor's resize rule (dynamic resolution)."""
        size = image_size(sample.image) if sample.image is not None else None
        if size is None:
            return 0
        processor = self.image_processor
        factor = int(processor.patch_size) * self.merge_size
        height, width = smart_resize(
            size[1],
            size[0],
            factor=factor,
            min_pixels=processor.size["shortest_edge"],
            max_pixels=processor.size["longest_edge"],
        )
        return (height // factor) * (width // factor)

    def row(self, ids: list[int], labels: list[int] | None, images: dict[str, Any], image_mask: Any) -> Row:
        return Row(ids, labels, images, {"mm_token_type_ids": image_mask})
