"""What a composed VLM is made of, as validated config: no torch, so configs load fast."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    projector: str = "linear"
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


__all__ = ["PartSpec", "TokenizerSpec", "VLMSpec"]
