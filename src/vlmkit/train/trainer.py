"""transformers.Trainer with the guarantees vlmkit promises on top of it.

- Checkpoints are written to `.incomplete/` and renamed into place, so a crash mid-write never
  leaves a `checkpoint-N` that looks complete; rotation runs only over complete ones.
- A non-finite loss or gradient norm stops the run (or skips the step) naming the step and the
  batch's sample ids.
- Batches can group questions about one image (ImageChunkSampler).
- FSDP also runs on CPU processes (gloo), where accelerate would otherwise fall back to DDP.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.train.collate import SampleDataset
from vlmkit.train.sampling import ImageChunkSampler

logger = logging.getLogger(__name__)

STAGING = ".incomplete"


class TrainingDiverged(VlmkitError):
    """The loss or gradient norm became NaN/inf."""


class CheckpointWriteError(VlmkitError):
    """A checkpoint could not be written (disk full, permissions)."""


def describe_os_error(
    error: OSError, where: Path, needed: int | None = None, advice: str | None = None
) -> str:
    """One line for a failed write: the folder, the bytes needed where known, and a fix that helps."""
    return describe_write_error(error.errno, str(error.strerror or error), where, needed, advice)


def describe_write_error(
    code: int | None, detail: str, where: Path, needed: int | None = None, advice: str | None = None
) -> str:
    if code == errno.ENOSPC or code == errno.EDQUOT:
        free = free_bytes(where)
        sizes = ", ".join(
            part
            for part in (
                f"needs about {megabytes(needed)}" if needed else "",
                f"{megabytes(free)} free" if free is not None else "",
            )
            if part
        )
        return (
            f"disk full while writing {where}"
            + (f" ({sizes})" if sizes else "")
            + (f"; {advice or 'free space there or choose another output_dir'}")
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        kind = "read-only file system" if code == errno.EROFS else "no permission"
        return f"{kind}: cannot write {where}; choose a writable output_dir or fix the folder's permissions"
    return f"could not write {where} ({detail}); check the disk and output_dir"


def write_error(
    error: BaseException, where: Path, needed: int | None = None, advice: str | None = None
) -> CheckpointWriteError | None:
    """The one-line error for an exception raised while writing `where`, or None when it is not one.

    Writes fail as OSError (Python), RuntimeError (torch.save: "file write failed", no errno) or
    SafetensorError ("... (os error 28)"); the errno comes from the exception, its text, or failing
    that from the free space left."""
    if isinstance(error, VlmkitError):
        return None
    if isinstance(error, OSError) and error.errno is not None:
        return CheckpointWriteError(describe_os_error(error, where, needed, advice))
    text = str(error)
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]|Os \{ code: (\d+)", text)
    if found:
        code: int | None = int(next(g for g in found.groups() if g))
    elif "No space left" in text:
        code = errno.ENOSPC
    elif isinstance(error, RuntimeError) and re.search(
        r"write failed|failed writing|PytorchStreamWriter", text
    ):
        free = free_bytes(where)
        code = errno.ENOSPC if free is not None and free < max(needed or 0, 1 << 20) else None
    elif type(error).__name__ == "SafetensorError" or isinstance(error, OSError):
        code = None
    else:
        return None
    detail = text.strip().splitlines()[-1][:200] if text.strip() else type(error).__name__
    return CheckpointWriteError(describe_write_error(code, detail, where, needed, advice))


def free_bytes(where: Path) -> int | None:
    """Free space on the file system holding `where` (its nearest existing parent)."""
    for folder in [where, *where.parents]:
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def megabytes(count: int | None) -> str:
    return f"{(count or 0) / 1e6:.1f} MB"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def state_bytes(model: torch.nn.Module, optimizer: bool = True) -> int:
    """About what a checkpoint of `model` takes: weights, and AdamW's two moments for trainable ones."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + (2 * trainable if optimizer else 0)


class VlmkitTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        questions_per_image: int | None = None,
        sample_lengths: Callable[[Sequence[Sample]], list[int]] | None = None,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        max_consecutive_skips: int = 5,
        **kwargs: Any,
    ) -> None:
        """`sample_lengths` (the adapter's) gives token counts for length-grouped batching."""
        super().__init__(*args, **kwargs)
        self.questions_per_image = questions_per_image
        self.sample_lengths = sample_lengths
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps: list[int] = []
        self._batch_ids: list[str] = []
        self._step_ids: list[str] = []  # every sample id of the current optimiser step
        self._nonfinite_what: tuple[str, float] | None = None  # the first non-finite value this step
        self._skip_step = False  # set for the step being taken: optimizer and scheduler leave it alone
        self._consecutive_skips = 0
        self._skips_since_log = 0

    # -- FSDP on the CPU -----------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        """Let `fsdp` mean FSDP on CPU processes too.

        accelerate selects `DistributedType.FSDP` only for accelerator backends and on CPU
        processes silently drops the plugin, so the run would be DDP. torch's FSDP2 (`fully_shard`)
        runs on a CPU mesh over gloo, so on CPU the state is set to FSDP with the same plugin, as
        accelerate does on GPUs; everything after (wrapping, sharded steps, checkpoints) is theirs.
        """
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and fsdp_requested(self.args):
            promote_to_fsdp(state, FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {})))
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled:
            check_fsdp_loading(state.fsdp_plugin, self.model)

    # -- data ---------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.questions_per_image and isinstance(dataset, SampleDataset):
            return ImageChunkSampler(dataset.samples, self.questions_per_image, seed=self.args.seed)
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if strategy == "group_by_length" and isinstance(dataset, SampleDataset):
            # Trainer reads lengths from a `datasets` column or tokenised items; ours are Samples.
            if self.sample_lengths is None:
                raise ConfigError(
                    "train_sampling_strategy: group_by_length needs the adapter's sample lengths"
                )
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=self.sample_lengths(dataset.samples),
            )
        return super()._get_train_sampler(train_dataset)

    # -- guards -------------------------------------------------------------------------------
    # A non-finite loss or gradient norm marks the step; `_get_grad_norm` (called just before
    # `optimizer.step()`) decides, on every process alike, to stop or to skip the whole step: the
    # optimiser and the scheduler do not step, so no moment, step count or learning rate moves.
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._batch_ids = list(inputs.pop("sample_ids", []) or [])
        self._step_ids.extend(self._batch_ids)
        image_keys = inputs.pop("image_keys", None)
        cache = getattr(self.accelerator.unwrap_model(model), "vision_feature_cache", None)
        with cache.batch_keys(image_keys) if cache is not None else contextlib.nullcontext():
            result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        if self._nonfinite_what is None and not torch.isfinite(loss.detach()).all():
            self._nonfinite_what = ("loss", float(loss.detach().float().mean()))
        return result

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm) if norm is not None else 0.0
        if self._nonfinite_what is None and not math.isfinite(value):
            self._nonfinite_what = ("gradient norm", value)
        if self._any_process(self._nonfinite_what is not None):
            self._skip_this_step()
            return None  # nothing to log for a skipped step
        self._consecutive_skips = 0
        self._step_ids = []
        return norm

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process (so every process skips, or none: DDP stays in sync)."""
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.args.device), "sum")
        return bool(total.item() > 0)

    def _skip_this_step(self) -> None:
        step = self.state.global_step + 1
        what, value = self._nonfinite_what or ("loss or gradient norm", float("nan"))
        where = "" if self._nonfinite_what is not None else " on another process"
        message = f"{what} is {value}{where} at step {step} on samples [{sample_list(self._step_ids)}]"
        self._nonfinite_what = None
        self._step_ids = []
        if self.on_nonfinite == "stop":
            raise TrainingDiverged(
                f"{message}; lower training.learning_rate, check those samples, or set guard.on_nonfinite: skip"
            )
        self._consecutive_skips += 1
        if step not in self.skipped_steps:
            self.skipped_steps.append(step)
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"{self._consecutive_skips} steps in a row skipped (last: {message}); the run has diverged: "
                "lower training.learning_rate or raise guard.max_consecutive_skips"
            )
        logger.warning("skipping step: %s", message)
        self._skip_step = True
        self._hold_optimizer()

    def _hold_optimizer(self) -> None:
        """Make `optimizer.step()` a no-op for the step being skipped (`_maybe_log_save_evaluate` ends
        it). The skipped step reads as accelerate's `step_was_skipped` (as for an fp16 overflow), so
        Trainer leaves the scheduler alone too."""
        optimizer = self.optimizer
        if getattr(optimizer.step, "vlmkit_guard", False):
            return
        original = optimizer.step  # bound, or torch's LRScheduler counter wrapper

        def step(*args: Any, **kwargs: Any) -> Any:
            if hasattr(optimizer, "_is_overflow"):
                optimizer._is_overflow = self._skip_step  # a GradScaler's step sets it again
            return None if self._skip_step else original(*args, **kwargs)

        step.vlmkit_guard = True  # type: ignore[attr-defined]
        optimizer.step = step

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self._skip_step:
            self._skips_since_log += 1
        self._skip_step = False  # the step is over; the next one steps unless it is skipped too
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            if self._skips_since_log == self.state.global_step - self._globalstep_last_logged:
                tr_loss.fill_(float("nan"))  # only skipped steps since the last log: no loss to report
            self._skips_since_log = 0
        if self.control.should_save and self._any_process(bool(nonfinite_tensors(self.model))):
            check_finite(self.model, f"checkpoint-{self.state.global_step}", everywhere=True)
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)

    # -- resume -------------------------------------------------------------------------------
    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """Train no step past `max_steps`: Trainer's epoch loop, resumed from the final checkpoint of a
        run whose `max_steps` ends mid-epoch, would take one more step before its stop check."""
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Trainer's warnings, less tied weights (e.g. `lm_head.weight` = the embeddings), which
        safetensors stores once: missing from a checkpoint by design, and tied again here."""
        missing = set(load_result.missing_keys)
        tied = missing & tied_names(self.accelerator.unwrap_model(self.model))
        if tied:
            self.accelerator.unwrap_model(self.model).tie_weights()
        load_result = type(load_result)(
            missing_keys=[k for k in load_result.missing_keys if k not in tied],
            unexpected_keys=list(load_result.unexpected_keys),
        )
        if load_result.missing_keys or load_result.unexpected_keys:
            super()._issue_warnings_after_load(load_result)

    # -- checkpoints --------------------------------------------------------------------------
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        final_root = Path(self._get_output_dir(trial=trial))
        staging_root = final_root / STAGING
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        needed = self._checkpoint_bytes(final_root)
        if self.args.should_save:
            self._make_room(final_root, needed)
        original = self._get_output_dir
        self._get_output_dir = lambda trial=None: str(staging_root)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            failure = write_error(error, final_root / name, needed, self._space_advice())
            if failure is None:
                raise
            shutil.rmtree(staging_root, ignore_errors=True)  # leave no half checkpoint behind
            raise failure from None
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

    def _checkpoint_bytes(self, root: Path) -> int:
        """What the next checkpoint will take: the newest one's size, or an estimate from the model."""
        existing = [p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
        if existing:
            return folder_bytes(max(existing, key=lambda p: p.stat().st_mtime))
        return state_bytes(self.model, optimizer=not self.args.save_only_model)

    def _make_room(self, root: Path, needed: int) -> None:
        """When the disk cannot hold one more checkpoint, delete the oldest that rotation would delete
        after it anyway (keeping the newest), so `save_total_limit` bounds the space a run needs."""
        limit = self.args.save_total_limit
        free = free_bytes(root)
        if not limit or free is None or free >= needed * 1.05:
            return
        existing = sorted(
            (
                p
                for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if p.is_dir() and p.name.split("-")[-1].isdigit()
            ),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        best = self.state.best_model_checkpoint
        removable = [p for p in existing[: max(len(existing) - max(limit - 1, 1), 0)] if str(p) != best]
        for old in removable:
            logger.info("disk nearly full: removing %s before writing the next checkpoint", old)
            shutil.rmtree(old, ignore_errors=True)

    def _space_advice(self) -> str:
        limit = self.args.save_total_limit
        if limit is None or limit > 1:
            return (
                f"free space there, or set training.save_total_limit lower (now {limit}; old checkpoints "
                "are removed first when space is short)"
            )
        return "free space there, choose another output_dir, or set training.save_only_model: true"


def tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names that share their storage with an earlier name (tied weights)."""
    seen: dict[tuple[int, int], str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or not tensor.numel():
            continue
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def sample_list(ids: Sequence[str], shown: int = 8) -> str:
    """Sample ids for a message: the first few, then how many more."""
    listed = ", ".join(ids[:shown])
    return (listed + (f", ... ({len(ids) - shown} more)" if len(ids) > shown else "")) or "unknown"


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or inf."""
    bad = []
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


def check_finite(model: torch.nn.Module, what: str, *, everywhere: bool = False) -> None:
    """Refuse to write `what` from a model with NaN/inf weights (a diverged run must not look usable).

    `everywhere`: some process found them (so every process raises, none waits for the others)."""
    bad = nonfinite_tensors(model)
    if bad or everywhere:
        first = (
            f"{len(bad)} tensors hold NaN/inf (first {bad[0]})"
            if bad
            else "tensors on another process hold NaN/inf"
        )
        raise TrainingDiverged(
            f"not writing {what}: {first}; the run diverged: lower training.learning_rate and train again"
        )


def fsdp_requested(args: TrainingArguments) -> bool:
    """FSDP asked for by `training.fsdp` or by `accelerate launch` with an FSDP config."""
    return args.fsdp_plugin_args is not None or parse_flag_from_env("ACCELERATE_USE_FSDP")


def promote_to_fsdp(state: AcceleratorState, plugin: FullyShardedDataParallelPlugin) -> None:
    """What `AcceleratorState` does for FSDP on GPUs, for CPU processes."""
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


def persistent_buffers(model: torch.nn.Module) -> list[str]:
    """Names of the buffers saved in the state dict (e.g. BatchNorm running statistics)."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name in model.state_dict() if name not in parameters]


def check_fsdp_loading(plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module) -> None:
    """FSDP2's rank-0 loading (`cpu_ram_efficient_loading`) in accelerate <= 1.15 handles only
    parameters: a persistent buffer fails deep inside with "'Tensor' object has no attribute
    'device_mesh'" (huggingface/accelerate#3898). Say so before training starts."""
    if plugin.fsdp_version != 2 or not plugin.cpu_ram_efficient_loading:
        return
    buffers = persistent_buffers(model)
    if buffers:
        raise ConfigError(
            f"FSDP2 with fsdp_cpu_ram_efficient_loading cannot load this model's buffers ({buffers[0]}, "
            f"{len(buffers)} in all; accelerate issue #3898): set fsdp_cpu_ram_efficient_loading: false"
        )


def fsdp_units(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of each class FSDP2 made a unit (what the wrap policy chose; with the root)."""
    from torch.distributed.fsdp import FSDPModule

    def wrapped_class(module: torch.nn.Module) -> str:  # fully_shard swaps in a class FSDP<original>
        return next(c.__name__ for c in type(module).__mro__ if not issubclass(c, FSDPModule))

    return dict(Counter(wrapped_class(m) for m in model.modules() if isinstance(m, FSDPModule)))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
