"""transformers.Trainer with the guarantees vlmkit promises on top of it.

- Checkpoints are written to `.incomplete/` and renamed into place, so a crash mid-write never
  leaves a `checkpoint-N` that looks complete; rotation runs only over complete ones.
- A non-finite loss or gradient norm stops the run (or skips the step) naming the step and the
  batch's sample ids.
- Batches can group questions about one image (ImageChunkSampler).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vlmkit.errors import VlmkitError
from vlmkit.train.collate import SampleDataset
from vlmkit.train.sampling import ImageChunkSampler

logger = logging.getLogger(__name__)

STAGING = ".incomplete"


class TrainingDiverged(VlmkitError):
    """The loss or gradient norm became NaN/inf."""


class CheckpointWriteError(VlmkitError):
    """A checkpoint could not be written (disk full, permissions)."""


def describe_os_error(error: OSError, where: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"disk full while writing {where}; free space or set training.save_total_limit lower"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write {where}; choose a writable output_dir"
    return f"could not write {where} ({error.strerror or error}); check the disk and output_dir"


class VlmkitTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        questions_per_image: int | None = None,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.questions_per_image = questions_per_image
        self.on_nonfinite = on_nonfinite
        self.skipped_steps: list[int] = []
        self._batch_ids: list[str] = []

    # -- data ---------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.questions_per_image and isinstance(dataset, SampleDataset):
            return ImageChunkSampler(dataset.samples, self.questions_per_image, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # -- guards -------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._batch_ids = list(inputs.pop("sample_ids", []) or [])
        image_keys = inputs.pop("image_keys", None)
        cache = getattr(self.accelerator.unwrap_model(model), "vision_feature_cache", None)
        with cache.batch_keys(image_keys) if cache is not None else contextlib.nullcontext():
            result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        if not torch.isfinite(loss.detach()).all():
            self._nonfinite("loss", float(loss.detach().float().mean()))
            zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (zero, result[1]) if isinstance(result, tuple) else zero
        return result

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm) if norm is not None else 0.0
        if not math.isfinite(value):
            self._nonfinite("gradient norm", value)
            # Parameters whose grad is None are left alone by torch optimisers: the step is skipped.
            self.optimizer.zero_grad(set_to_none=True)
            return 0.0
        return norm

    def _nonfinite(self, what: str, value: float) -> None:
        step = self.state.global_step + 1
        ids = ", ".join(self._batch_ids[:8]) + (" ..." if len(self._batch_ids) > 8 else "")
        message = f"{what} is {value} at step {step} on samples [{ids or 'unknown'}]"
        if self.on_nonfinite == "stop":
            raise TrainingDiverged(
                f"{message}; lower training.learning_rate, check those samples, or set guard.on_nonfinite: skip"
            )
        logger.warning("skipping step: %s", message)
        if step not in self.skipped_steps:
            self.skipped_steps.append(step)

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        final_root = Path(self._get_output_dir(trial=trial))
        staging_root = final_root / STAGING
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging_root)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        except OSError as error:
            raise CheckpointWriteError(describe_os_error(error, staging_root / name)) from None
        finally:
            self._get_output_dir = original  # type: ignore[method-assign]
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = final_root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging_root / name, target)
            _fsync_dir(final_root)
            shutil.rmtree(staging_root, ignore_errors=True)
            if self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    STAGING + os.sep, ""
                )
            rotate_checkpoints(
                output_dir=str(final_root),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
