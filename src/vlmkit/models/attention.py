"""Which attention kernel a model's language model runs (`model.speed.attention`), and keeping it
faithful: an LM that soft-caps its attention scores (Gemma 2) never runs a kernel that cannot.

transformers 5.17 lets Gemma 2 run sdpa, which silently drops the soft-capping (later 5.x refuse
sdpa for it), so every adapter checks this when it is built and falls back to eager attention.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PreTrainedConfig

from vlmkit.errors import ConfigError
from vlmkit.models.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)

#: Kernels that apply `attn_logit_softcapping` (eager and flex call a score modifier; flash takes `softcap`).
SOFTCAPPING_KERNELS = frozenset({"eager", "flex_attention", "flash_attention_2", "flash_attention_3"})


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def language_model_config(model: nn.Module) -> PreTrainedConfig:
    """The config the language model's attention layers read (vlmkit's VLM: its LM's own)."""
    model = base_model(model)
    if isinstance(model, VisionLanguageModel):
        return model.language_model.config
    return model.config.get_text_config()


def language_model_attention(model: nn.Module) -> str | None:
    """The attention kernel the model's language model runs."""
    return language_model_config(model)._attn_implementation


def drops_capping(model: nn.Module, kernel: str | None) -> bool:
    """Whether `kernel` would drop the language model's attention soft-capping (Gemma 2 on sdpa)."""
    capped = bool(getattr(language_model_config(model), "attn_logit_softcapping", None))
    return capped and kernel not in SOFTCAPPING_KERNELS


def faithful_kernel(model: nn.Module, kernel: str | None) -> str | None:
    """`kernel`, or eager where `kernel` would drop the attention soft-capping."""
    return "eager" if drops_capping(model, kernel) else kernel


def set_attention(model: nn.Module, implementation: str, *, keep_capping: bool = True) -> None:
    """Run the language model's attention with `implementation` (the vision tower keeps its own).

    A transformers VLM is set through its `text_config`, so the parent, which builds the masks,
    and the language model agree on the kernel; vlmkit's VLM builds its masks from its LM's config.
    `keep_capping=False` only for a benchmark's reference, which runs what transformers allows.
    """
    model = base_model(model)
    if implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            "model.speed.attention: flex_attention is for CUDA GPUs (on CPU, transformers' flex masks "
            "gave NaN at lengths that are not multiples of 128); use sdpa or eager here"
        )
    if keep_capping and drops_capping(model, implementation):
        raise ConfigError(
            f"model.speed.attention: {implementation} cannot apply this language model's attention "
            "soft-capping (attn_logit_softcapping); use eager or flex_attention"
        )
    try:
        if isinstance(model, VisionLanguageModel):
            model.language_model.set_attn_implementation(implementation)
        else:
            model.set_attn_implementation({"text_config": implementation})
    except (ValueError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".")
        raise ConfigError(
            f"model.speed.attention: {implementation} cannot run here ({reason}); "
            "choose another kernel or leave it unset"
        ) from None


def keep_softcapping(model: nn.Module) -> None:
    """Move a soft-capping LM off a kernel that would drop the capping (to eager)."""
    kernel = language_model_attention(model)
    if drops_capping(model, kernel):
        logger.info("%s attention cannot soft-cap attention scores; the language model runs eager", kernel)
        set_attention(model, "eager")
