"""Admission: what a request costs is measured before it may wait for the model.

Images are decoded in a small thread pool (never on the event loop), and a prompt that cannot
fit the model's context is refused here with 400 `context_length_exceeded`: once queued it would
occupy (or, at 1.5M tokens, crash) a whole batch, and prefill cannot be interrupted. Texts far
too long to fit are refused from their character count alone, without tokenizing megabytes; the
rest are counted by the engine (see prompt_length.py), from their text and image sizes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vlmkit.data.sample import Sample
from vlmkit.serve.conversation import GenerationParams, conversation
from vlmkit.serve.engine import Engine
from vlmkit.serve.errors import bad_request
from vlmkit.serve.images import load_image_url
from vlmkit.serve.prompt_length import prompt_text
from vlmkit.serve.schemas import ChatCompletionRequest
from vlmkit.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admitted:
    sample: Sample
    params: GenerationParams
    prompt_tokens: int
    nbytes: int


class Admission:
    """Owns the decode pool; asks the engine for prompt lengths and what images it takes."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.context = engine.limits.context
        self.pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers, thread_name_prefix="vlmkit-decode"
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def admit(self, chat: ChatCompletionRequest, params: GenerationParams, request_id: str) -> Admitted:
        """The request's Sample and final params (max_tokens fitted to the context), or a 4xx."""
        limits = self.engine.limits
        most = min(self.settings.max_images, limits.max_images or self.settings.max_images)
        messages, urls = conversation(chat, fewest=limits.min_images, most=most)
        limit = self.context
        if limit is not None and len(prompt_text(messages)) > limit * limits.chars_per_token:
            raise self._too_long(f"more than {limit}")  # without tokenizing it
        images = await asyncio.gather(*(load_image_url(url, self.settings, self.pool) for url in urls))
        tokens = await self.engine.prompt_tokens(messages, [image.size for image in images])
        fitted = params.fit_to_context(tokens, limit)
        image = images[0] if len(images) == 1 else list(images) or None
        nbytes = sum(image.width * image.height * len(image.getbands()) for image in images)
        return Admitted(Sample(id=request_id, image=image, messages=messages), fitted, tokens, nbytes)

    def _too_long(self, tokens: str) -> Exception:
        return bad_request(
            f"this model's context is {self.context} tokens and the prompt has {tokens}; "
            "shorten the conversation",
            param="messages",
            code="context_length_exceeded",
        )
