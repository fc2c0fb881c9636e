"""Vision backbones: building and loading towers, and feature selection.

The registry (`BACKBONES`, one line per Hugging Face model type, in `vlmkit.models.specs` so
configs validate without torch) is keyed by the exact `model_type`, never a substring of a name.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from vlmkit.errors import ConfigError
from vlmkit.models.specs import BACKBONES, DUAL_ENCODERS, Backbone

__all__ = ["BACKBONES", "DUAL_ENCODERS", "Backbone", "select_features", "vision_config_of"]

FeatureSelect = Literal["cls_patch", "patch", "cls"]


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
