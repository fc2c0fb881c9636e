"""Apply `model.speed` (SpeedSpec) to a loaded adapter: the speed/memory levers vlmkit owns.

Trainer's own levers (torch_compile, optim, gradient_checkpointing, dataloader workers, ...) are
`training:` keys and need nothing here; docs/performance.md lists both kinds with their effects.
Applying is idempotent, so each stage (and a reloaded stage model) can apply it again.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from vlmkit.config import SpeedSpec
from vlmkit.errors import ConfigError
from vlmkit.models.adapters.base import ModelAdapter
from vlmkit.models.adapters.families import BY_MODEL_TYPE
from vlmkit.models.attention import base_model, set_attention
from vlmkit.models.feature_cache import VisionFeatureCache
from vlmkit.models.loss import labelled_loss
from vlmkit.models.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)

PATCHED = "_vlmkit_labelled_loss"


def install_labelled_loss(model: nn.Module, fused: bool = False) -> None:
    """Make a transformers VLM's `forward(..., labels=...)` build vocabulary logits only at
    labelled positions (the family's own forward builds them at every position, image tokens too).

    The instance's `forward` is replaced, so DDP/FSDP wrappers and peft, which call
    `module(...)` / `model.forward(...)`, all reach it; without labels the family's forward runs
    unchanged (generation). The loss is the family's own: same shift, same soft-capping, same
    divisor (`num_items_in_batch` when Trainer passes it).
    """
    family_forward = type(model).forward.__get__(model)
    text_config = model.config.get_text_config()
    family = BY_MODEL_TYPE.get(model.config.model_type)
    softcap = (
        getattr(text_config, "final_logit_softcapping", None)
        if family is not None and family.final_softcapping
        else None
    )

    @functools.wraps(family_forward)  # generate() and Trainer read the family's signature
    def forward(
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if labels is None:
            return family_forward(input_ids=input_ids, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        hidden = model.model(input_ids=input_ids, **kwargs)[0]
        loss = labelled_loss(
            hidden,
            labels,
            model.get_output_embeddings(),
            softcap=softcap,
            num_items_in_batch=num_items_in_batch,
            fused=fused,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = forward
    setattr(model, PATCHED, True)


def remove_labelled_loss(model: nn.Module) -> None:
    if getattr(model, PATCHED, False):
        del model.forward  # the class's forward shows through again
        delattr(model, PATCHED)


def generation_settings(spec: SpeedSpec) -> dict[str, Any]:
    """GenerationConfig fields for the generation levers.

    A static cache makes transformers compile the decoding step by itself on CUDA; without
    `compile_generation` that is turned off, so the two levers can be measured apart.
    """
    if spec.generation_cache == "dynamic":
        return {}
    return {"cache_implementation": "static", "disable_compile": not spec.compile_generation}


def attach_feature_cache(model: VisionLanguageModel, spec: SpeedSpec) -> VisionFeatureCache:
    device = "cpu" if spec.vision_feature_cache_device == "cpu" else None
    existing = model.vision_feature_cache
    if existing is not None:
        return existing
    cache = VisionFeatureCache(int(spec.vision_feature_cache_gib * 2**30), device=device)
    model.vision_feature_cache = cache
    return cache


def apply_speed(adapter: ModelAdapter, spec: SpeedSpec) -> None:
    """Set every lever of `spec` on `adapter` (and turn off those it leaves off)."""
    model = base_model(adapter.model)
    if isinstance(model, VisionLanguageModel):
        model.fused_cross_entropy = spec.fused_cross_entropy
        if spec.vision_feature_cache:
            attach_feature_cache(model, spec)
        else:
            model.vision_feature_cache = None
        adapter.emit_image_keys = spec.vision_feature_cache  # type: ignore[attr-defined]
    else:
        if spec.vision_feature_cache:
            raise ConfigError(
                "model.speed.vision_feature_cache is built for vlmkit's own VLM (model.init); "
                f"not for {model.config.model_type} models"
            )
        remove_labelled_loss(model)
        if spec.labelled_loss:
            install_labelled_loss(model, fused=spec.fused_cross_entropy)
    if spec.attention is not None:
        set_attention(model, spec.attention)
    adapter.generation_settings = generation_settings(spec)
    logger.info("speed levers: %s", spec.model_dump())
