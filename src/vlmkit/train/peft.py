"""LoRA / QLoRA through peft: which layers get adapters, 4-bit loading, and LoRA folders read back.

`all-linear` means every linear layer of the *language model*: the vision tower and projector are
added only when `lora.vision` / `lora.projector` ask for them. The layers are chosen by each
family's module layout (exact module paths in its `Family` record) and handed to peft as an
explicit list of module names, so nothing is picked by a substring of its name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.config import LoraSpec, QuantizationSpec
from vlmkit.errors import ConfigError, ModelLoadError
from vlmkit.models.adapters.base import ModelAdapter

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def bnb_config(spec: QuantizationSpec) -> Any:
    """bitsandbytes settings for loading: QLoRA's 4-bit nf4 + double quantisation + bf16 compute."""
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, spec.compute_dtype)
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def part_of(name: str, parts: Mapping[str, tuple[str, ...]]) -> str | None:
    """The part a module path belongs to: the one whose path is its longest prefix."""
    best, best_len = None, -1
    for part, prefixes in parts.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = part, len(prefix)
    return best


def model_parts(model: nn.Module) -> Mapping[str, tuple[str, ...]]:
    """The family record's module paths of vision tower / projector / language model."""
    from vlmkit.models.adapters.families import family_of

    try:
        return family_of(getattr(model.config, "model_type", None)).parts
    except ModelLoadError as exc:
        raise ConfigError(f"LoRA / freeze cannot find the model's parts: {exc}") from None


def lora_target_modules(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the linear layers to adapt: the LM's, plus vision tower / projector if asked.

    `target_modules` is `all-linear`, a list of layer names (`[q_proj, v_proj]`: matched against
    the last component of each module path) or a regex the whole module path must match; either
    way the choice is restricted to the parts selected. The output head is never adapted.
    """
    parts = model_parts(model)
    wanted = (
        {"language"} | ({"vision"} if spec.vision else set()) | ({"projector"} if spec.projector else set())
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = spec.target_modules
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head or part_of(name, parts) not in wanted:
            continue
        if targets == "all-linear":
            names.append(name)
        elif isinstance(targets, str):
            if re.fullmatch(targets, name):
                names.append(name)
        elif name.rsplit(".", 1)[-1] in targets:
            names.append(name)
    if not names:
        raise ConfigError(
            f"model.lora.target_modules {targets!r} matches no linear layer in {', '.join(sorted(wanted))}; "
            "use all-linear or names such as q_proj, v_proj"
        )
    return names


def set_lora_trainable(
    model: nn.Module, parts: Mapping[str, tuple[str, ...]], *, vision: bool, projector: bool, lm: bool
) -> None:
    """`freeze:` on a LoRA model freezes that part's LoRA weights; base weights stay frozen."""
    allowed = {"vision": vision, "projector": projector, "language": lm}
    base = model.get_base_model()
    for name, module in base.named_modules():
        if hasattr(module, "lora_A"):
            part = part_of(name, parts) or "language"
            for parameter in (*module.lora_A.parameters(), *module.lora_B.parameters()):
                parameter.requires_grad_(allowed[part])


def apply_lora(adapter: ModelAdapter, spec: LoraSpec, quantized: bool) -> None:
    """Wrap `adapter.model` with LoRA adapters (in place); with `quantized`, prepare k-bit training.

    k-bit preparation casts norms to fp32 and turns on gradient checkpointing (QLoRA's memory
    recipe); input embeddings are made to require grad so checkpointing still back-propagates
    into the LoRA weights when the base weights are all frozen.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = adapter.model
    if isinstance(model, PeftModel):
        logger.info("model already carries LoRA weights; training them further")
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)  # peft's own naming of LoRA weights
        return
    model_parts(model)  # a family without a record fails here, before any work
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    targets = lora_target_modules(model, spec)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        modules_to_save=spec.modules_to_save,
        bias="none",
    )
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info(
        "LoRA r=%d on %d layers: %d of %d parameters trainable", spec.r, len(targets), trainable, total
    )
    adapter.model = peft_model


def set_trainable(model: nn.Module, *, vision: bool, projector: bool, lm: bool) -> None:
    """`freeze:` for every family: by the family record's parts (a module outside every part, such
    as a top-level `lm_head`, counts as language). On a LoRA model only the LoRA weights of a part
    are switched; the base weights stay frozen."""
    from vlmkit.models.attention import base_model

    inner = base_model(model)
    parts = model_parts(inner)
    if inner is not model:
        set_lora_trainable(model, parts, vision=vision, projector=projector, lm=lm)
        return
    if hasattr(model, "set_trainable"):  # vlmkit's own VLM (it also keeps tied weights consistent)
        model.set_trainable(vision=vision, projector=projector, lm=lm)
        return
    allowed = {"vision": vision, "projector": projector, "language": lm}
    for name, parameter in model.named_parameters():
        part = part_of(name.rsplit(".", 1)[0], parts) or "language"
        parameter.requires_grad_(allowed[part])


def is_lora_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_base(path: str | Path) -> tuple[str, str | None]:
    """(base model path or hub id, its model_type if recorded) of a LoRA folder."""
    from vlmkit.models.adapters.hf_base import BASE_POINTER_FILE

    folder = Path(path)
    pointer = folder / BASE_POINTER_FILE
    if pointer.is_file():
        data = json.loads(pointer.read_text())
        base = data["base_model"]
        if not Path(base).is_absolute() and (folder / base).is_dir():  # a base saved inside the folder
            base = str(folder / base)
        return base, data.get("model_type")
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError):
        raise ModelLoadError(
            f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path)"
        ) from None
    if not base:
        raise ModelLoadError(f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base, None


def load_lora(path: str | Path, *, is_trainable: bool = False, **kwargs: Any) -> ModelAdapter:
    """Load a LoRA folder: its base model (by pointer) with the folder's tokenizer, then the LoRA weights."""
    from peft import PeftModel

    from vlmkit.models.adapters import adapter_class, model_type_of
    from vlmkit.models.adapters.hf_generic import HFGenericAdapter

    base, model_type = lora_base(path)
    if model_type is None:
        model_type = model_type_of(base)
    cls = adapter_class(model_type)
    if issubclass(cls, HFGenericAdapter):
        kwargs["processor_path"] = path
    adapter = cls.load(base, **kwargs)
    adapter.model = PeftModel.from_pretrained(adapter.model, str(path), is_trainable=is_trainable)
    return adapter
