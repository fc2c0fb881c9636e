"""Vision backbones: one registry line per Hugging Face model type, and feature selection.

The registry is keyed by the config's exact `model_type`, never by a substring of a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from vlmkit.errors import ConfigError

FeatureSelect = Literal["cls_patch", "patch", "cls"]


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


def vision_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """The vision config itself, taking the vision half of a CLIP/SigLIP dual config."""
    if config.model_type in DUAL_ENCODERS:
        config = getattr(config, DUAL_ENCODERS[config.model_type])
    if config.model_type not in BACKBONES:
        raise ConfigError(
            f"vision backbone type {config.model_type!r} is not supported; "
            f"use one of: {', '.join(sorted(BACKBONES))}"
        )
    return config


def build_vision_tower(config: PretrainedConfig) -> nn.Module:
    return AutoModel.from_config(vision_config_of(config))


def load_vision_tower(path: str) -> nn.Module:
    """Load pretrained weights; a CLIP/SigLIP checkpoint contributes only its vision half."""
    config = vision_config_of(AutoConfig.from_pretrained(path))
    model_class = type(AutoModel.from_config(config))
    return model_class.from_pretrained(path, config=config)


def select_features(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    layer: int,
    select: FeatureSelect,
) -> torch.Tensor:
    """Run the tower and return (B, N, D) tokens from hidden layer `layer`."""
    backbone = BACKBONES[tower.config.model_type]
    use_last = layer == -1
    outputs = tower(pixel_values=pixel_values, output_hidden_states=not use_last, return_dict=True)
    hidden = outputs.last_hidden_state if use_last else outputs.hidden_states[layer]
    if backbone.layout == "feature_map":
        tokens = hidden.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if select == "patch":
            return tokens
        pooled = (hidden.mean(dim=(2, 3)) if not use_last else outputs.pooler_output.flatten(1)).unsqueeze(1)
        return pooled if select == "cls" else torch.cat([pooled, tokens], dim=1)
    if select == "cls":
        if not backbone.has_cls:
            raise ConfigError(f"{tower.config.model_type} has no CLS token; use feature_select: patch")
        return hidden[:, :1]
    if select == "patch" and backbone.has_cls:
        return hidden[:, 1:]
    return hidden


def freeze_unused(tower: nn.Module) -> None:
    for name in BACKBONES[tower.config.model_type].unused:
        owner, _, attr = name.rpartition(".")
        parameter = getattr(tower.get_submodule(owner), attr, None)
        if isinstance(parameter, nn.Parameter):
            parameter.requires_grad_(False)


def feature_dim(tower: nn.Module) -> int:
    config = tower.config
    if BACKBONES[config.model_type].layout == "feature_map":
        return int(config.hidden_sizes[-1])
    return int(config.hidden_size)
