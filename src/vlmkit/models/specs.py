"""What a composed VLM is made of, as validated config: no torch, so configs load fast."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass(frozen=True)
class Backbone:
    """How a backbone's outputs become a token sequence.

    `sequence` models (ViTs) return (B, T, D) hidden states, with a CLS token first when
    `has_cls`; `feature_map` models (CNNs) return (B, C, H, W) maps whose H*W cells become
    tokens, and their pooled output stands in for CLS.
    """

    layout: Literal["sequence", "feature_map"]
    has_cls: bool
    # Parameters a VLM's forward never uses (masked-image-modelling tokens): kept frozen, since a
    # "trainable" parameter that never gets a gradient trips DDP and FSDP resume.
    unused: tuple[str, ...] = ()


BACKBONES: dict[str, Backbone] = {
    "dinov2": Backbone("sequence", has_cls=True, unused=("embeddings.mask_token",)),
    "vit": Backbone("sequence", has_cls=True, unused=("embeddings.mask_token",)),
    "clip_vision_model": Backbone("sequence", has_cls=True),
    "siglip_vision_model": Backbone("sequence", has_cls=False),
    "resnet": Backbone("feature_map", has_cls=True),
    "convnext": Backbone("feature_map", has_cls=True),
}

# Dual (image + text) checkpoints whose vision half is the tower: model_type -> vision sub-config key.
DUAL_ENCODERS: dict[str, str] = {"clip": "vision_config", "siglip": "vision_config"}


#: The projectors `vlmkit.models.projectors.PROJECTORS` holds, by name.
PROJECTOR_NAMES = ("linear", "mlp", "resampler")


def _known_type(model_type: str, known: list[str], what: str) -> None:
    if model_type not in known:
        close = difflib.get_close_matches(model_type, known, 3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{what} model_type {model_type!r} is not one transformers knows{hint}")


def _check_heads(config: dict[str, Any], where: str) -> None:
    """hidden_size must split into whole heads unless head_dim is given (else a shape error deep
    in the first forward)."""
    width, heads = config.get("hidden_size"), config.get("num_attention_heads")
    whole = not (isinstance(width, int) and isinstance(heads, int) and heads > 0) or width % heads == 0
    if not whole and "head_dim" not in config:
        raise ValueError(
            f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads}; "
            "choose a divisor (or set head_dim)"
        )
    kv = config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise ValueError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )


class PartSpec(BaseModel):
    """A backbone from a config dict (`model_type` plus fields) or from `pretrained` weights."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] | None = None
    pretrained: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PartSpec:
        if (self.config is None) == (self.pretrained is None):
            raise ValueError("give exactly one of `config` (random init) or `pretrained` (path or hub id)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("a part's `config` needs a `model_type` (e.g. dinov2, resnet, qwen2, gemma2)")
        return self


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = None
    kind: Literal["word", "bpe"] = "word"
    vocab_size: int = Field(default=8000, ge=16)
    lowercase: bool = True
    chat_template: str | None = None


class VLMSpec(BaseModel):
    """How to compose a VisionLanguageModel; every field maps onto VLMConfig or a part."""

    model_config = ConfigDict(extra="forbid")

    vision: PartSpec
    language_model: PartSpec
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    projector: str = "linear"  # one of PROJECTOR_NAMES
    projector_hidden_size: int | None = None
    projector_dropout: float = 0.0
    projector_kwargs: dict[str, Any] = Field(default_factory=dict)
    feature_layer: int = -1
    feature_select: Literal["cls_patch", "patch", "cls"] = "cls_patch"
    image_size: int = 224
    image_placement: Literal["before_text", "after_text"] = "before_text"
    image_mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    dropout: float | None = None  # sets the LM's attention/hidden dropout where its config has one

    @field_validator("projector")
    @classmethod
    def _known_projector(cls, name: str) -> str:
        if name not in PROJECTOR_NAMES:
            raise ValueError(f"projector {name!r} is not one of {', '.join(PROJECTOR_NAMES)}")
        return name

    @model_validator(mode="after")
    def _known_parts(self) -> VLMSpec:
        """Model types and head counts, checked without importing transformers (vlmkit.hf_schema)."""
        from vlmkit.hf_schema import model_types

        if self.vision.config is not None:
            vision_type = self.vision.config["model_type"]
            supported = sorted({*BACKBONES, *DUAL_ENCODERS})
            if vision_type not in supported:
                close = difflib.get_close_matches(vision_type, supported, 2)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(
                    f"vision.config.model_type {vision_type!r} is not a supported backbone{hint}; "
                    f"use one of: {', '.join(supported)}"
                )
            _check_heads(self.vision.config, "vision.config")
        if self.language_model.config is not None:
            _known_type(self.language_model.config["model_type"], model_types(), "language_model.config")
            _check_heads(self.language_model.config, "language_model.config")
        return self


__all__ = [
    "BACKBONES",
    "DUAL_ENCODERS",
    "PROJECTOR_NAMES",
    "Backbone",
    "PartSpec",
    "TokenizerSpec",
    "VLMSpec",
]
