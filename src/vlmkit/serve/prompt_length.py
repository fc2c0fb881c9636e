"""How many tokens a prompt will encode to, known before it queues, from its text and image sizes.

The count is the text's tokens plus the adapter's per-image count plus what the chat template and
image markers add, calibrated once at start-up against the adapter's real `encode` for 0, 1 and 2
images (as many as the adapter takes). It lives wherever the model lives (its thread, or its
process), and needs only messages and (width, height) pairs, never the pixels.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlmkit.data.sample import Message, Sample, text_of
from vlmkit.models.adapters.base import ModelAdapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptLimits:
    """What admission needs to know of the model, small enough to send between processes."""

    context: int | None
    chars_per_token: int
    min_images: int
    max_images: int | None


def model_context(adapter: ModelAdapter) -> int | None:
    """The most positions the adapter's model takes (the smallest limit found), or None if unknown."""
    limits: list[int] = []
    max_length = getattr(adapter, "max_length", None)
    if isinstance(max_length, int) and max_length > 0:
        limits.append(max_length)
    model = getattr(adapter, "model", None)
    configs = [getattr(model, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    configs.append(getattr(getattr(model, "language_model", None), "config", None))
    for config in configs:
        value = getattr(config, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return min(limits) if limits else None


def prompt_text(messages: Sequence[Message]) -> str:
    return "\n".join(text_of(message) for message in messages)


class PromptCounter:
    """Counts prompt tokens for one adapter (thread-safe: a private tokenizer behind a lock)."""

    def __init__(self, adapter: ModelAdapter, max_context_tokens: int | None = None) -> None:
        self.adapter = adapter
        lowest, highest = adapter.images_per_sample()
        context = max_context_tokens or model_context(adapter)
        if context is None:
            logger.warning("the model's context length is unknown; set max_context_tokens to bound prompts")
        # a private tokenizer: the model thread's encode may change padding/truncation state meanwhile
        self._tokenizer = copy.deepcopy(adapter.tokenizer)
        self._lock = threading.Lock()
        self.limits = PromptLimits(context, _max_chars_per_token(self._tokenizer), lowest, highest)
        self._base, self._per_message, self._per_image = self._calibrate()

    def count(self, messages: Sequence[Message], sizes: Sequence[tuple[int, int]]) -> int:
        """About how many tokens `encode` gives a prompt of `messages` showing images of `sizes`."""
        with self._lock:
            text = len(self._tokenizer(prompt_text(messages), add_special_tokens=False)["input_ids"])
        images = self.adapter.image_tokens_for(sizes)
        base = self._base.get(min(len(sizes), 1), self._base.get(1, 0))
        extra_images = self._per_image * max(len(sizes) - 1, 0)
        return text + images + base + extra_images + self._per_message * (len(messages) - 1)

    # -- calibration ---------------------------------------------------------------------------------
    def _calibrate(self) -> tuple[dict[int, int], int, int]:
        """Tokens `encode` adds beyond text and per-image counts: per prompt (by 0 or 1 image), per
        extra message, per extra image. An adapter that cannot encode a probe counts text only."""
        lowest, highest = self.limits.min_images, self.limits.max_images
        one: list[Message] = [{"role": "user", "content": "hi"}]
        three: list[Message] = [
            *one,
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "hi"},
        ]
        base: dict[int, int] = {}
        try:
            for images in (0, 1):
                if lowest <= images and (highest is None or images <= highest):
                    base[images] = self._overhead(one, images)
            key = 1 if 1 in base else 0
            per_message = (self._overhead(three, key) - base[key]) // 2
            per_image = 0
            if highest is None or highest >= 2:
                two: list[Message] = [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}],
                    }
                ]
                per_image = self._overhead(two, 2) - base.get(1, 0)
        except Exception as exc:
            logger.warning("could not calibrate prompt lengths (%s); counting text tokens only", exc)
            return {}, 0, 0
        return {k: max(v, 0) for k, v in base.items()}, max(per_message, 0), max(per_image, 0)

    def _overhead(self, messages: list[Message], images: int) -> int:
        probe = [Image.new("RGB", (32, 32), "gray") for _ in range(images)]
        image: Any = None if not probe else probe[0] if images == 1 else probe
        sample = Sample(id="probe", image=image, messages=messages)
        batch = self.adapter.encode([sample], train=False)
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(batch["input_ids"].shape[-1])
        with self._lock:
            text = len(self._tokenizer(prompt_text(messages), add_special_tokens=False)["input_ids"])
        return real - text - self.adapter.image_tokens_for([(32, 32)] * images)


def _max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for (its vocabulary's longest entry)."""
    try:
        vocab = tokenizer.get_vocab()
        added = set(tokenizer.get_added_vocab())
    except Exception:  # a tokenizer without a vocabulary listing (test fakes)
        return 64
    return max((len(token) for token in vocab if token not in added), default=64) or 64
