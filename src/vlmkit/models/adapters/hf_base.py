"""Small helpers every adapter shares (the LoRA base pointer, peft detection, the image dtype)."""

from __future__ import annotations

from typing import Any

import torch

#: written next to LoRA weights: which base model they adapt and with which adapter.
BASE_POINTER_FILE = "vlmkit_base.json"


def model_float_dtype(model: Any) -> torch.dtype | None:
    """The dtype image tensors must have: the model's first floating weight."""
    for parameter in model.parameters():
        if parameter.dtype.is_floating_point:
            return parameter.dtype
    return None


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is in the train extra
        return False
    return isinstance(model, PeftModel)
