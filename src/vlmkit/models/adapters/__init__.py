"""Adapter registry: a model folder's `model_type` picks its family record (families.py), which names its adapter."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import ModelLoadError
from vlmkit.models.adapters.base import Batch, ModelAdapter
from vlmkit.models.adapters.families import FAMILIES, Family, family_of


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter of a model_type's family record (imported on use: a family's code costs nothing otherwise)."""
    module, _, name = family_of(model_type).adapter.partition(":")
    return getattr(importlib.import_module(module), name)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_config_file(repo_id: str) -> Path:
    """config.json of a hub model (from the local cache when offline)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as exc:
        raise ModelLoadError(
            f"{repo_id} is not a local folder and its config could not be fetched from the hub "
            f"({type(exc).__name__}); download it first or check the name"
        ) from None


def model_type_of(path: str | Path) -> str:
    config_file = Path(path) / "config.json"
    if not config_file.is_file() and (Path(path) / "adapter_config.json").is_file():
        from vlmkit.train.peft import lora_base

        base, model_type = lora_base(path)
        return model_type or model_type_of(base)
    if not Path(path).exists() and HUB_ID.fullmatch(str(path)):
        config_file = hub_config_file(str(path))
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path} is not a model folder (no config.json); pass a folder written by `vlmkit train` "
            "or `save_pretrained`"
        )
    try:
        return json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError):
        raise ModelLoadError(f"{config_file} is not a valid model config (no model_type)") from None


def load_adapter(
    path: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None, **kwargs: Any
) -> ModelAdapter:
    """Open any supported model folder behind the common adapter interface.

    A LoRA folder (adapter_config.json) loads its base model, then the LoRA weights on top.
    """
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        from vlmkit.train.peft import load_lora

        return load_lora(path, device=device, dtype=dtype, **kwargs)
    return adapter_class(model_type_of(path)).load(path, device=device, dtype=dtype, **kwargs)


__all__ = [
    "FAMILIES",
    "Batch",
    "Family",
    "ModelAdapter",
    "adapter_class",
    "family_of",
    "load_adapter",
    "model_type_of",
]
