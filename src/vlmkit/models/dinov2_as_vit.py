"""A DINOv2 tower rewritten, exactly, as a transformers ViT, for LLaVA folders that take its last layer.

LLaVA hands the projector `hidden_states[vision_feature_layer]`; for the last layer vlmkit feeds
the tower's final, layer-normed output. ViT returns that tensor as `hidden_states[-1]` when its
config says `tie_last_hidden_states`, but DINOv2's encoder cannot (its final norm sits outside the
encoder that collects the hidden states). The two towers are the same network up to DINOv2's
layer scales, which fold into the linear layers before them (`λ ⊙ (W x + b)` = `(λ W) x + λ b`),
and its interpolated position embeddings, which are fixed once the image size is: so the export
writes a ViT whose outputs equal DINOv2's at the model's image size.
"""

from __future__ import annotations

import torch
from torch import nn


def dinov2_vit_problem(tower: nn.Module) -> str | None:
    """Why this DINOv2 tower has no exact ViT form (one clause), or None."""
    config = tower.config
    if getattr(config, "use_swiglu_ffn", False):
        return "its SwiGLU feed-forward (DINOv2 giant) has no ViT equivalent"
    if getattr(config, "num_register_tokens", 0):
        return "its register tokens have no ViT equivalent"
    return None


def vit_config(tower: nn.Module, image_size: int) -> dict:
    """The ViT config of the same network at `image_size` (last hidden state tied to the normed one)."""
    config = tower.config
    return {
        "model_type": "vit",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": int(config.hidden_size * config.mlp_ratio),
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": image_size,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "qkv_bias": config.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "tie_last_hidden_states": True,
    }


@torch.no_grad()
def vit_state_dict(tower: nn.Module, image_size: int) -> dict[str, torch.Tensor]:
    """DINOv2's weights under ViT's names (without a prefix), layer scales folded in."""
    config = tower.config
    embeddings = tower.embeddings
    side = image_size // config.patch_size
    probe = torch.zeros(1, 1 + side * side, config.hidden_size, dtype=embeddings.cls_token.dtype)
    state: dict[str, torch.Tensor] = {
        "embeddings.cls_token": embeddings.cls_token.detach().clone(),
        "embeddings.position_embeddings": embeddings.interpolate_pos_encoding(probe, image_size, image_size)
        .detach()
        .clone(),
        "embeddings.patch_embeddings.projection.weight": embeddings.patch_embeddings.projection.weight.detach(),
        "embeddings.patch_embeddings.projection.bias": embeddings.patch_embeddings.projection.bias.detach(),
        "layernorm.weight": tower.layernorm.weight.detach(),
        "layernorm.bias": tower.layernorm.bias.detach(),
    }
    for index, layer in enumerate(tower.encoder.layer):
        out = f"layers.{index}."
        attention = layer.attention
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(attention, name)
            state[f"{out}attention.{name}.weight"] = linear.weight.detach()
            state[f"{out}attention.{name}.bias"] = linear.bias.detach()
        scale1, scale2 = layer.layer_scale1.lambda1.detach(), layer.layer_scale2.lambda1.detach()
        state[f"{out}attention.o_proj.weight"] = attention.o_proj.weight.detach() * scale1[:, None]
        state[f"{out}attention.o_proj.bias"] = attention.o_proj.bias.detach() * scale1
        state[f"{out}layernorm_before.weight"] = layer.norm1.weight.detach()
        state[f"{out}layernorm_before.bias"] = layer.norm1.bias.detach()
        state[f"{out}layernorm_after.weight"] = layer.norm2.weight.detach()
        state[f"{out}layernorm_after.bias"] = layer.norm2.bias.detach()
        state[f"{out}mlp.fc1.weight"] = layer.mlp.fc1.weight.detach()
        state[f"{out}mlp.fc1.bias"] = layer.mlp.fc1.bias.detach()
        state[f"{out}mlp.fc2.weight"] = layer.mlp.fc2.weight.detach() * scale2[:, None]
        state[f"{out}mlp.fc2.bias"] = layer.mlp.fc2.bias.detach() * scale2
    # ViTModel builds a pooler (`AutoModel` of the config); LLaVA never reads it, so it is zero.
    width = config.hidden_size
    state["pooler.dense.weight"] = torch.zeros(width, width, dtype=embeddings.cls_token.dtype)
    state["pooler.dense.bias"] = torch.zeros(width, dtype=embeddings.cls_token.dtype)
    return state
