"""The model adapter: the one seam between "a model" and training, evaluation, chat and serving.

An adapter owns its model's prompt format, image processing and label masking. Everything
downstream calls `encode` (Samples -> tensors the model's forward takes, with labels when
training) and `generate` (Samples -> answers), so adding a model family is one adapter file.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from vlmkit.data.sample import Sample
from vlmkit.errors import SampleError

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class ModelAdapter(ABC):
    """Base class: subclasses implement `load`, `save`, `encode`; `generate` is shared."""

    #: config.json `model_type` values this adapter serves (exact match, no substrings).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: whether `model.generate` returns the prompt tokens before the new ones.
    generate_returns_prompt: ClassVar[bool] = True
    #: whether every turn of a conversation merged by `data.*.turns_per_image` is trained (with
    #: isolated turns in vlmkit's own VLM, as plain multi-turn elsewhere); False: refused at load.
    trains_merged_turns: ClassVar[bool] = True

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    #: extra GenerationConfig fields (model.speed: static KV cache, compiled decoding).
    generation_settings: Mapping[str, Any] = MappingProxyType({})
    #: `model.max_length`: the longest encoded sample (None: no bound).
    max_length: int | None = None

    def check_length(self, sample: Sample, length: int) -> None:
        """The one length rule of every adapter: a longer sample is refused, never truncated."""
        if self.max_length is not None and length > self.max_length:
            raise SampleError(
                sample.id,
                f"{length} tokens exceed max_length {self.max_length}; raise model.max_length "
                "(truncating would drop answer tokens)",
            )

    @classmethod
    @abstractmethod
    def load(
        cls, path: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> ModelAdapter:
        """Load model, tokenizer and processor from a folder (or hub id, when online)."""

    @abstractmethod
    def save(self, out_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a folder that `load` (and transformers, for HF families) reads back.

        `state_dict` replaces the model's own weights (as in `save_pretrained`): the full weights
        gathered from a model whose parameters are sharded across processes (FSDP).
        """

    @abstractmethod
    def encode(self, samples: Sequence[Sample], *, train: bool = True) -> Batch:
        """Tensors for `model(**batch)`; with `train`, `labels` are -100 except on answer tokens."""

    @property
    def device(self) -> torch.device:
        return self.model.device

    def sample_lengths(self, samples: Sequence[Sample]) -> list[int]:
        """About how many tokens each sample encodes to, for length-grouped batching: its text's
        tokens plus its image's, without processing any image."""
        texts = ["\n".join(message["content"] for message in sample.messages) for sample in samples]
        tokens = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) + self.image_tokens_of(sample) for ids, sample in zip(tokens, samples, strict=True)]

    def image_tokens_of(self, sample: Sample) -> int:
        """The image's token count where it varies per image; a constant needs no estimate (0)."""
        return 0

    def image_tokens_for(self, sizes: Sequence[tuple[int, int]]) -> int:
        """`image_tokens_of` from images' (width, height) alone (serving counts before it queues)."""
        return 0

    def images_per_sample(self) -> tuple[int, int | None]:
        """Fewest and most images one sample may show (None: no limit); one, unless the adapter says."""
        return 1, 1

    def stop_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def generation_config(
        self,
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        **extra: Any,
    ) -> GenerationConfig:
        """What `generate` hands the model's own `generate`: stop ids, padding, model.speed settings."""
        fields: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature if do_sample else None,
            "top_p": top_p if do_sample else None,
            "top_k": None,
            "eos_token_id": self.stop_token_ids(),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        return GenerationConfig(**{**fields, **self.generation_settings, **extra})

    @torch.inference_mode()
    def generate(
        self,
        samples: Sequence[Sample],
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        streamer: BaseStreamer | None = None,
        generation_options: Mapping[str, Any] | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> list[str]:
        """Answer each sample's prompt (its messages up to the last user turn).

        `generation_options` are extra GenerationConfig fields (e.g. `repetition_penalty`,
        `min_new_tokens`); with `num_return_sequences` k there are k answers per sample, sample by
        sample. `logits_processor` / `stopping_criteria` go to the model's `generate` as they are.
        """
        batch = {k: v.to(self.device) for k, v in self.encode(samples, train=False).items()}
        if seed is not None:
            torch.manual_seed(seed)
        config = self.generation_config(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            **dict(generation_options or {}),
        )
        self.model.eval()
        hooks: dict[str, Any] = {}
        if logits_processor:
            hooks["logits_processor"] = logits_processor
        if stopping_criteria:
            hooks["stopping_criteria"] = stopping_criteria
        output = self.model.generate(**batch, generation_config=config, streamer=streamer, **hooks)
        if self.generate_returns_prompt:
            output = output[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [truncate_at_stop(text.strip(), stop) for text in texts]


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut at the earliest stop string, as the OpenAI API does."""
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].rstrip()
