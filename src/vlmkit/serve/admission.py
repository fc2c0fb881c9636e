"""Admission: what a request costs is measured before it may wait for the model.

Images are decoded and prompts counted in a small thread pool (never on the event loop), and a
prompt that cannot fit the model's context is refused here with 400 `context_length_exceeded`:
once queued it would occupy (or, at 1.5M tokens, crash) a whole batch, and prefill cannot be
interrupted. The count is the prompt's text tokens plus the image's and the chat template's,
calibrated once at start-up against the adapter's real `encode`; texts far too long to fit are
refused from their character count alone, without tokenizing megabytes.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlmkit.data.sample import Message, Sample
from vlmkit.models.adapters.base import ModelAdapter
from vlmkit.serve.conversation import GenerationParams, conversation
from vlmkit.serve.errors import bad_request
from vlmkit.serve.images import load_image_url
from vlmkit.serve.schemas import ChatCompletionRequest
from vlmkit.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admitted:
    sample: Sample
    params: GenerationParams
    prompt_tokens: int
    nbytes: int


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


class Admission:
    """Owns the decode pool and the prompt-length estimate for one served adapter."""

    def __init__(self, adapter: ModelAdapter, settings: ServeSettings) -> None:
        self.adapter = adapter
        self.settings = settings
        self.context = settings.max_context_tokens or model_context(adapter)
        if self.context is None:
            logger.warning("the model's context length is unknown; set max_context_tokens to bound prompts")
        self.pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers, thread_name_prefix="vlmkit-decode"
        )
        # a private tokenizer: the model thread's encode may change padding/truncation state meanwhile
        self._tokenizer = copy.deepcopy(adapter.tokenizer)
        self._lock = threading.Lock()
        self._chars_per_token = _max_chars_per_token(self._tokenizer)
        self._base, self._per_message = self._calibrate()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def admit(self, chat: ChatCompletionRequest, params: GenerationParams, request_id: str) -> Admitted:
        """The request's Sample and final params (max_tokens fitted to the context), or a 4xx."""
        messages, url = conversation(chat)
        prompt = _prompt_text(messages)
        if self.context is not None and len(prompt) > self.context * self._chars_per_token:
            raise self._too_long(f"more than {self.context}")  # without tokenizing it
        image = await load_image_url(url, self.settings, self.pool)
        sample = Sample(id=request_id, image=image, messages=messages)
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(self.pool, self.prompt_tokens, sample)
        fitted = params.fit_to_context(tokens, self.context)
        return Admitted(sample, fitted, tokens, image.width * image.height * len(image.getbands()))

    def prompt_tokens(self, sample: Sample) -> int:
        """About how many tokens `encode` gives the prompt (calibrated; image tokens included)."""
        messages = sample.prompt_messages()
        with self._lock:
            text = len(self._tokenizer(_prompt_text(messages), add_special_tokens=False)["input_ids"])
        image = self.adapter.image_tokens_of(sample)
        return text + image + self._base + self._per_message * (len(messages) - 1)

    def _too_long(self, tokens: str) -> Exception:
        return bad_request(
            f"this model's context is {self.context} tokens and the prompt has {tokens}; "
            "shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )

    def _calibrate(self) -> tuple[int, int]:
        """Tokens `encode` adds beyond the text: once per prompt (image, template) and per message."""
        image = Image.new("RGB", (32, 32), "gray")
        one: list[Message] = [{"role": "user", "content": "hi"}]
        three: list[Message] = [
            *one,
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "hi"},
        ]
        try:
            real = [self._encoded_length(Sample(id="probe", image=image, messages=m)) for m in (one, three)]
        except Exception as exc:  # an adapter that cannot encode a probe: count text tokens only
            logger.warning("could not calibrate prompt lengths (%s); counting text tokens only", exc)
            return 0, 0
        base = real[0] - self._text_and_image(Sample(id="probe", image=image, messages=one))
        extra = real[1] - self._text_and_image(Sample(id="probe", image=image, messages=three)) - base
        return max(base, 0), max(extra // 2, 0)

    def _text_and_image(self, sample: Sample) -> int:
        ids = self._tokenizer(_prompt_text(sample.prompt_messages()), add_special_tokens=False)["input_ids"]
        return len(ids) + self.adapter.image_tokens_of(sample)

    def _encoded_length(self, sample: Sample) -> int:
        batch = self.adapter.encode([sample], train=False)
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].shape[-1])


def _prompt_text(messages: list[Message]) -> str:
    return "\n".join(message["content"] for message in messages)


def _max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token stands for (its vocabulary's longest entry)."""
    try:
        vocab = tokenizer.get_vocab()
        added = set(tokenizer.get_added_vocab())
    except Exception:  # a tokenizer without a vocabulary listing (test fakes)
        return 64
    return max((len(token) for token in vocab if token not in added), default=64) or 64
