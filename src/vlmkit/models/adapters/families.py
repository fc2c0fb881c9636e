"""One record per model family: everything vlmkit needs to know about it, in one place.

A family's record names its transformers class and processor class, where its vision tower,
projector and language model live (for `freeze:` and LoRA target selection), and any quirk. The
encoding itself comes from the family's own processor and chat template (`hf_generic`), so adding
a transformers image-text-to-text family is adding one `Family(...)` to `FAMILIES`.
Only this module and `vlmkit.errors` are imported here: it is read by the registry, LoRA, the
planner and the speed levers, none of which may pull in a family's code to look it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vlmkit.errors import ModelLoadError

GENERIC = "vlmkit.models.adapters.hf_generic:HFGenericAdapter"

#: The usual transformers layout: `model.vision_tower`, `model.multi_modal_projector`, `model.language_model`.
STANDARD_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",),
    }
)
QWEN_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "vision": ("model.visual",),
        "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
        "language": ("model.language_model",),
    }
)
IDEFICS_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "vision": ("model.vision_model",),
        "projector": ("model.connector",),
        "language": ("model.text_model",),
    }
)


@dataclass(frozen=True)
class Family:
    """What vlmkit knows about one model family (one or more config.json `model_type`s)."""

    name: str
    model_types: tuple[str, ...]
    #: transformers class that loads the checkpoint (None: vlmkit's own VLM).
    model_class: str | None
    #: transformers processor class: built from the tokenizer + image processor when the folder's
    #: processor cannot be loaded (a processor that wants a video processor, without torchvision).
    processor_class: str | None = None
    #: part -> module paths; a module belongs to the part whose path is its longest prefix.
    parts: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: STANDARD_PARTS)
    #: "module:Class" of the adapter; the generic one unless the family's input truly differs.
    adapter: str = GENERIC
    #: adapter options (model.adapter_options) with defaults; unknown keys are a ConfigError.
    options: Mapping[str, Any] = field(default_factory=dict)
    #: the LM head applies the text config's `final_logit_softcapping` (kept by the fused loss).
    final_softcapping: bool = False
    #: whether the processor takes several images per sample (interleaved image content parts).
    multi_image: bool = True
    #: not served, and why (one line for the error).
    refusal: str | None = None


QWEN_OPTIONS: Mapping[str, Any] = MappingProxyType({"min_pixels": None, "max_pixels": None})

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "vlmkit_vlm",
            ("vlmkit_vlm",),
            None,
            parts={"vision": ("vision_tower",), "projector": ("projector",), "language": ("language_model",)},
            adapter="vlmkit.models.adapters.vlm:VLMAdapter",
        ),
        Family(
            "paligemma",
            ("paligemma",),
            "PaliGemmaForConditionalGeneration",
            "PaliGemmaProcessor",
            adapter="vlmkit.models.adapters.paligemma:PaliGemmaAdapter",
            options={"prompt_prefix": "answer en "},
            final_softcapping=True,
            multi_image=False,
        ),
        Family(
            "qwen2_vl",
            ("qwen2_vl",),
            "Qwen2VLForConditionalGeneration",
            "Qwen2VLProcessor",
            parts=QWEN_PARTS,
            options=QWEN_OPTIONS,
        ),
        Family(
            "qwen2_5_vl",
            ("qwen2_5_vl",),
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLProcessor",
            parts=QWEN_PARTS,
            options=QWEN_OPTIONS,
        ),
        Family(
            "qwen3_vl",
            ("qwen3_vl",),
            "Qwen3VLForConditionalGeneration",
            "Qwen3VLProcessor",
            parts=QWEN_PARTS,
            options=QWEN_OPTIONS,
        ),
        Family("llava", ("llava",), "LlavaForConditionalGeneration", "LlavaProcessor"),
        Family("llava_next", ("llava_next",), "LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
        Family(
            "llava_onevision",
            ("llava_onevision",),
            "LlavaOnevisionForConditionalGeneration",
            "LlavaOnevisionProcessor",
        ),
        Family(
            "idefics3",
            ("idefics3",),
            "Idefics3ForConditionalGeneration",
            "Idefics3Processor",
            parts=IDEFICS_PARTS,
        ),
        Family(
            "smolvlm",
            ("smolvlm",),
            "SmolVLMForConditionalGeneration",
            "SmolVLMProcessor",
            parts=IDEFICS_PARTS,
        ),
        Family(
            "gemma3",
            ("gemma3",),
            "Gemma3ForConditionalGeneration",
            "Gemma3Processor",
            final_softcapping=True,
        ),
        Family("internvl", ("internvl",), "InternVLForConditionalGeneration", "InternVLProcessor"),
        Family("mistral3", ("mistral3",), "Mistral3ForConditionalGeneration", "PixtralProcessor"),
        Family(
            "mllama",
            ("mllama",),
            "MllamaForConditionalGeneration",
            "MllamaProcessor",
            refusal=(
                "mllama (Llama 3.2 Vision) feeds images through cross-attention layers with per-tile "
                "aspect-ratio masks, which the generic decoder-only adapter does not build yet"
            ),
        ),
    )
}

BY_MODEL_TYPE: dict[str, Family] = {
    model_type: family for family in FAMILIES.values() for model_type in family.model_types
}

HOW_TO_ADD = (
    "add a Family record to vlmkit/models/adapters/families.py (docs/architecture.md, 'How to add a family')"
)


def family_of(model_type: str | None) -> Family:
    """The record for a config's model_type; a one-line ModelLoadError naming the fix otherwise."""
    family = BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        supported = ", ".join(sorted(t for t, f in BY_MODEL_TYPE.items() if f.refusal is None))
        raise ModelLoadError(
            f"no vlmkit family record for model type {model_type!r} (supported: {supported}); {HOW_TO_ADD}"
        )
    if family.refusal is not None:
        raise ModelLoadError(f"model type {model_type!r} is not supported: {family.refusal}")
    return family


def parts_of(model_type: str | None) -> Mapping[str, tuple[str, ...]]:
    """Module paths of a family's vision tower / projector / language model (empty if unknown)."""
    family = BY_MODEL_TYPE.get(model_type or "")
    return family.parts if family is not None else {}
