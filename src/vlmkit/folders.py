"""Writing a model folder so that a crash never leaves one that looks complete.

Loaders and stage resume take a folder holding `config.json` (or `adapter_config.json`) as a
model, and `save_pretrained` writes that file first. So folders are written beside their place
under a staging name and renamed into it only once every file is there.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def holds_model(folder: str | Path) -> bool:
    """Whether `folder` is a model folder, whole or LoRA, with its weights (what loaders and stage
    resume take): a folder whose safetensors were deleted is not a finished model."""
    folder = Path(folder)
    described = (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
    return described and weights


def write_folder(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(staging)`, then put the staging folder at `out`, replacing what was there."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        previous = out.with_name(f".{out.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        staging.rename(out)
    return out
