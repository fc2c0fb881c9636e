"""Shared fixtures: tiny random models saved to temp folders, so the real loading code runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VISION = {
    "model_type": "resnet",
    "embedding_size": 16,
    "hidden_sizes": [16, 32],
    "depths": [1, 1],
    "layer_type": "basic",
}
TINY_LM = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
}

# A transformer tower like seed 000's (DINOv2): no BatchNorm, an unused mask_token.
TINY_DINOV2 = {
    "model_type": "dinov2",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
}


def tiny_spec(**overrides):
    from vlmkit.models.specs import VLMSpec

    fields = {
        "vision": {"config": TINY_VISION},
        "language_model": {"config": TINY_LM},
        "image_size": 32,
        "projector": "mlp",
    }
    fields.update(overrides)
    return VLMSpec.model_validate(fields)


def tiny_config(tmp_path, **changes) -> dict:
    config = {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "model": {
            "init": {
                "vision": {"config": TINY_VISION},
                "language_model": {"config": TINY_LM},
                "image_size": 32,
                "projector": "mlp",
            }
        },
        "data": {"train": {"source": "easyvqa", "split": "train", "limit": 64}},
        "training": {
            "per_device_train_batch_size": 16,
            "max_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-3,
        },
    }
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


@pytest.fixture(scope="session")
def easyvqa_samples():
    from vlmkit.data.sources import load_samples

    return load_samples({"source": "easyvqa", "split": "test", "limit": 64})


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, easyvqa_samples) -> Path:
    """A saved, randomly initialised vlmkit VLM (ResNet tower + 2-layer Qwen2) with its tokenizer."""
    import torch

    from vlmkit.models.build import build_vlm

    torch.manual_seed(0)
    texts = [m["content"] for s in easyvqa_samples for m in s.messages]
    adapter = build_vlm(tiny_spec(), texts)
    out = tmp_path_factory.mktemp("tiny_vlm")
    adapter.save(out)
    return out
