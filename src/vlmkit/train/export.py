"""`vlmkit export --merge RUN OUT`: fold LoRA weights into the base model and write a plain HF folder.

The result (safetensors weights, config, tokenizer, image processor, chat template) loads with
transformers alone and serves with vLLM like the original checkpoint; a VLM composed by vlmkit is
written as a LLaVA folder where it has that form (`models/llava_format.py`). A QLoRA run is merged into a
freshly loaded *unquantised* base (its saved dtype, bf16 for the hub checkpoints), never into
4-bit weights, which would round the LoRA update away.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

from vlmkit.errors import ConfigError, ModelLoadError
from vlmkit.folders import holds_model, write_folder
from vlmkit.models.adapters import load_adapter
from vlmkit.models.adapters.hf_base import is_peft_model
from vlmkit.models.llava_format import llava_incompatibility, save_llava, vlmkit_readme, write_readme
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.peft import is_lora_dir, lora_base

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dir_of(run_or_model_dir: Path) -> Path:
    """A run folder's final model (RUN/model), or the folder itself when it holds a model."""
    folder = Path(run_or_model_dir)
    for candidate in (folder, folder / "model"):
        if holds_model(candidate):
            return candidate
    raise ModelLoadError(
        f"{folder} holds no model (no config.json or adapter_config.json, nor a model/ folder)"
    )


def saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the (base) weights were saved in; float32 when the config does not say."""
    config_dir = Path(lora_base(model_dir)[0]) if is_lora_dir(model_dir) else model_dir
    config_file = config_dir / "config.json"
    if not config_file.is_file():  # a hub id: its config comes from the cache
        from vlmkit.models.adapters import hub_config_file

        config_file = hub_config_file(str(config_dir))
    config = json.loads(config_file.read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


ExportFormat = Literal["auto", "llava", "vlmkit"]


def export_merged(
    run_or_model_dir: Path,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    format: ExportFormat = "auto",
) -> Path:
    """Write a merged, standalone model folder to `out` and return it.

    `dtype` defaults to the base model's saved dtype. A folder without LoRA weights is re-saved
    as it is (so `export` also turns a run into a clean model folder). `format` matters for a VLM
    composed by vlmkit: `auto` writes a LLaVA folder (plain transformers / vLLM load it) when the
    model has that form and a vlmkit folder with a README saying why not otherwise; `llava` refuses
    a model without that form; `vlmkit` keeps vlmkit's own format.
    """
    source = model_dir_of(Path(run_or_model_dir))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"{out} exists and is not empty; choose a new output folder")
    adapter = load_adapter(source, dtype=dtype or saved_dtype(source))
    if is_peft_model(adapter.model):
        adapter.model = adapter.model.merge_and_unload()
        logger.info("merged LoRA weights of %s into its base", source)
    if isinstance(adapter.model, VisionLanguageModel):
        model, writer = adapter.model, adapter.save
        reason = (
            "it was exported with --format vlmkit" if format == "vlmkit" else llava_incompatibility(model)
        )
        if format == "llava" and reason is not None:
            raise ConfigError(f"{source} has no LLaVA form: {reason}; export with --format vlmkit")
        if reason is None:
            return write_folder(
                out, lambda folder: save_llava(model, adapter.tokenizer, adapter.image_processor, folder)
            )
        logger.info("writing a vlmkit folder: %s", reason)

        def write_vlmkit(folder: Path) -> None:
            writer(folder)
            write_readme(folder, vlmkit_readme(reason))

        return write_folder(out, write_vlmkit)
    if format == "llava":
        raise ConfigError(
            f"--format llava is for VLMs composed by vlmkit; {source} is already a transformers model"
        )
    return write_folder(out, adapter.save)
