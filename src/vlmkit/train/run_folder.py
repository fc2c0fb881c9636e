"""What a run folder must prove before a run continues in it.

- `fingerprint.json`: the resolved config (less keys that cannot change the weights: logging,
  checkpoint cadence, dataloader workers, evaluation) and a hash of each stage's training data.
  Resume compares it and refuses another run's folder or a changed config, naming the keys.
- `.lock`: an exclusive `flock` held for the whole run, so a second run in the folder refuses at
  start (the kernel drops it when the process dies, even by SIGKILL).
- Checkpoints are taken only when complete (weights, optimizer, scheduler, RNG state, trainer
  state, each file whole); a damaged newest one is set aside and the previous one used.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, VlmkitError

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
LOCK = ".lock"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# `training:` keys that change how a run is logged, saved or fed, never its weights.
NEUTRAL_TRAINING = frozenset(
    {
        "output_dir",
        "logging_dir",
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "save_safetensors",
        "save_on_each_node",
        "report_to",
        "run_name",
        "disable_tqdm",
        "dataloader_num_workers",
        "dataloader_persistent_workers",
        "dataloader_pin_memory",
        "dataloader_prefetch_factor",
        "eval_strategy",
        "eval_steps",
        "per_device_eval_batch_size",
        "push_to_hub",
        "hub_model_id",
    }
)


class RunFolderError(VlmkitError):
    """The run folder holds another run, a changed config, or is in use."""


def comparable_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved config less what cannot change the trained weights."""
    config = json.loads(json.dumps(resolved))
    for key in ("output_dir", "name", "eval"):
        config.pop(key, None)
    config.get("data", {}).pop("eval", None)
    for section in [config, *config.get("stages", [])]:
        training = section.get("training") or {}
        for key in list(training):
            if key in NEUTRAL_TRAINING:
                training.pop(key)
        if isinstance(section.get("data"), dict):
            section["data"].pop("eval", None)
    return config


def data_hash(samples: Iterable[Any]) -> str:
    """A hash of the training samples: ids, conversations, answers and image paths (not pixels)."""
    digest = hashlib.sha256()
    for sample in samples:
        images = sample.image if isinstance(sample.image, list) else [sample.image]
        paths = [str(image) if isinstance(image, str | os.PathLike) else None for image in images]
        row = [sample.id, sample.messages, sample.answers, paths]
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def fingerprint(resolved: dict[str, Any], train_sets: Sequence[Iterable[Any]]) -> dict[str, Any]:
    return {"config": comparable_config(resolved), "data": [data_hash(samples) for samples in train_sets]}


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two configs differ (`training.learning_rate`, `stages.1.name`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [d for k in keys for d in differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in differing_keys(a, b, f"{prefix}{i}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def fingerprint_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changes = differing_keys(recorded.get("config"), current["config"])
    old_data, new_data = recorded.get("data") or [], current["data"]
    if len(old_data) != len(new_data):
        changes.append("data")
    else:
        changes += [
            f"data of stage {i + 1}"
            for i, (a, b) in enumerate(zip(old_data, new_data, strict=True))
            if a != b
        ]
    return changes


def read_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / FINGERPRINT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: treated as another run's


def write_fingerprint(run_dir: Path, record: dict[str, Any], *, finished: bool) -> None:
    path = run_dir / FINGERPRINT
    staging = path.with_name(f"{FINGERPRINT}.{os.getpid()}.tmp")  # one per process
    staging.write_text(json.dumps({**record, "finished": finished}, indent=2))
    os.replace(staging, path)


def holds_training_state(run_dir: Path) -> bool:
    """Whether a folder holds checkpoints or models (its own, or its stages')."""
    if not run_dir.is_dir():
        return False
    for folder in [run_dir, *(p for p in run_dir.iterdir() if p.is_dir())]:
        if (folder / "model").is_dir() or any(CHECKPOINT.match(p.name) for p in folder.iterdir()):
            return True
    return False


def check_resume(
    run_dir: Path, current: dict[str, Any], *, resume: bool | None, accept_changes: bool
) -> dict[str, Any] | None:
    """What was recorded in `run_dir`, after refusing a folder this run must not continue in.

    Returns the recorded fingerprint when the run continues (None for a fresh start)."""
    if resume is False:
        return None
    recorded = read_fingerprint(run_dir)
    fix = "choose another output_dir, pass --no-resume to train from scratch there"
    if recorded is None:
        if holds_training_state(run_dir):
            raise RunFolderError(
                f"{run_dir} holds checkpoints or a model of another run (no {FINGERPRINT}); {fix}"
            )
        return None
    if not recorded:
        raise RunFolderError(f"{run_dir / FINGERPRINT} is unreadable; {fix}")
    changes = fingerprint_changes(recorded, current)
    if changes and not accept_changes:
        shown = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise RunFolderError(
            f"{run_dir} holds a run with a different config or data ({shown}); {fix}, "
            "or --accept-changes to resume it anyway"
        )
    if changes:
        logger.warning(
            "resuming %s with changes (%s); the optimizer and scheduler state come from the checkpoint",
            run_dir,
            ", ".join(changes),
        )
    return recorded


class RunLock:
    """An exclusive lock on a run folder for as long as the run lives."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.handle: Any = None

    def acquire(self) -> RunLock:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(
                    f"{self.path.parent} is in use by another run ({owner}); wait for it to end or "
                    "choose another output_dir"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# -- checkpoints ------------------------------------------------------------------------------
def damage(checkpoint: Path, *, needs_optimizer: bool = True) -> str | None:
    """Why `checkpoint` cannot be resumed from exactly, or None when every part is there and whole."""
    names = {p.name for p in checkpoint.iterdir()} if checkpoint.is_dir() else set()
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is damaged"
    weights = [
        p for p in checkpoint.iterdir() if p.suffix == ".safetensors" or p.name.startswith("pytorch_model")
    ]
    if not weights:
        return "its weights (model.safetensors) are missing"
    if needs_optimizer:
        if not any(n.startswith("optimizer") for n in names):
            return "optimizer.pt is missing"
        if "scheduler.pt" not in names:
            return "scheduler.pt is missing"
        if not any(n.startswith("rng_state") for n in names):
            return "its RNG state (rng_state.pth) is missing"
    for path in sorted(checkpoint.iterdir()):
        problem = safetensors_damage(path) if path.suffix == ".safetensors" else None
        if path.suffix in (".pt", ".pth", ".bin") and not zip_whole(path):
            problem = "is truncated or damaged"
        if problem:
            return f"{path.name} {problem}"
    return None


def safetensors_damage(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the tensors' bytes."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size:
                return "is truncated"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return "is truncated or damaged"
    end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
    return None if size == 8 + length + end else "is truncated"


def zip_whole(path: Path) -> bool:
    """torch.save writes a zip archive; a truncated one has no central directory at its end."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-N` folders, newest first."""
    found = (
        [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)] if folder.is_dir() else []
    )
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


def last_complete_checkpoint(
    folder: Path, *, needs_optimizer: bool = True, set_aside: bool = True
) -> Path | None:
    """The newest checkpoint that can be resumed from exactly; damaged newer ones are renamed
    `damaged-checkpoint-N` (so neither resume nor rotation takes them) and reported."""
    for checkpoint in checkpoints(folder):
        problem = damage(checkpoint, needs_optimizer=needs_optimizer)
        if problem is None:
            return checkpoint
        aside = checkpoint.with_name(f"damaged-{checkpoint.name}")
        logger.warning(
            "%s cannot be resumed from (%s); %s",
            checkpoint,
            problem,
            f"moved to {aside.name}, trying the previous checkpoint"
            if set_aside
            else "trying the previous one",
        )
        if set_aside:
            if aside.exists():
                import shutil

                shutil.rmtree(aside, ignore_errors=True)
            os.replace(checkpoint, aside)
    return None


def no_complete_checkpoint(folder: Path) -> ConfigError:
    return ConfigError(
        f"no complete checkpoint in {folder} to resume from; pass --no-resume to train from scratch"
    )
