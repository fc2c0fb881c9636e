"""`vlmkit train`: build or load the model, then run each stage on transformers.Trainer.

Run folder: config.yaml (resolved), run.json (versions, git commit, seed, command),
checkpoints, model/ (the final model), metrics.json, loss.png, bad_samples.jsonl, eval/.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vlmkit.config import RunConfig, Stage
from vlmkit.data.sample import Sample
from vlmkit.data.sources import load_samples
from vlmkit.errors import ConfigError
from vlmkit.folders import holds_model, write_folder
from vlmkit.models.adapters import ModelAdapter, load_adapter
from vlmkit.models.build import build_vlm
from vlmkit.train.callbacks import MetricsRecorder, ProgressBar
from vlmkit.train.collate import BadSampleLog, SampleDataset
from vlmkit.train.levers import apply_speed
from vlmkit.train.objectives.setup import objective_parts
from vlmkit.train.run_folder import (
    RunLock,
    check_resume,
    checkpoints,
    fingerprint,
    fingerprint_changes,
    last_complete_checkpoint,
    no_complete_checkpoint,
    write_fingerprint,
)
from vlmkit.train.trainer import (
    STAGING,
    CheckpointWriteError,
    VlmkitTrainer,
    check_finite,
    describe_os_error,
    fsdp_units,
    state_bytes,
    write_error,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Defaults that make Trainer fit Samples; any of them can be overridden in `training:`.
TRAINING_DEFAULTS: dict[str, Any] = {
    "remove_unused_columns": False,
    "report_to": "none",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    # On a GPU machine, encode batches in 2 worker processes that live across epochs (so their pixel
    # caches survive), overlapping the training step; see docs/performance.md.
    "dataloader_num_workers": 2 if torch.cuda.is_available() else 0,
    "dataloader_persistent_workers": torch.cuda.is_available(),
    "dataloader_pin_memory": torch.cuda.is_available(),
    "disable_tqdm": True,
}


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    stages: list[dict[str, Any]] = field(default_factory=list)
    eval_summary: dict[str, Any] | None = None
    bad_samples: int = 0


def run_metadata(config: RunConfig, command: str | None) -> dict[str, Any]:
    import accelerate
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "command": command or " ".join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(),
        "seed": config.seed,
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        "cuda": torch.cuda.is_available(),
    }


def training_texts(samples: list[Sample]) -> list[str]:
    texts = [message["content"] for sample in samples for message in sample.messages]
    return texts + [
        s.meta["rejected"] for s in samples if isinstance(s.meta.get("rejected"), str)
    ]  # DPO pairs


def build_model(config: RunConfig, train_sets: list[list[Sample]] | None) -> ModelAdapter:
    """The model to train; a from-scratch tokenizer learns from every stage's training text."""
    section = config.model
    adapter_kwargs = _adapter_kwargs(config)
    if section.quantization is not None and section.lora is None:
        raise ConfigError(
            "model.quantization needs model.lora: 4-bit weights cannot be trained, QLoRA trains LoRA "
            "weights on top of them; add a lora section or drop quantization"
        )
    if section.init is not None:
        texts = [text for samples in train_sets or [] for text in training_texts(samples)]
        adapter = build_vlm(section.init, texts, quantization=section.quantization, **adapter_kwargs)
    else:
        dtype = DTYPES[section.dtype] if section.dtype else None
        if section.quantization is not None:
            adapter_kwargs["quantization"] = section.quantization
        adapter = load_adapter(section.pretrained, dtype=dtype, **adapter_kwargs)
    if section.lora is not None:
        from vlmkit.train.peft import apply_lora

        apply_lora(adapter, section.lora, quantized=section.quantization is not None)
    return adapter


def trainer_is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _adapter_kwargs(config: RunConfig) -> dict[str, Any]:
    """What the adapter is built with, and rebuilt with when a stage's saved model is reloaded."""
    return {
        "max_length": config.model.max_length,
        "image_cache_size": config.model.image_cache_size,
        **config.model.adapter_options,
    }


def apply_freeze(adapter: ModelAdapter, stage: Stage) -> dict[str, Any]:
    """Freeze parts for this stage and report what remains trainable (count and names)."""
    freeze = stage.freeze
    model = adapter.model
    if freeze is not None:  # every family, by its record's parts (train/peft.set_trainable)
        from vlmkit.train.peft import set_trainable

        set_trainable(model, vision=not freeze.vision, projector=not freeze.projector, lm=not freeze.lm)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("stage %s: %d of %d parameters trainable (%d tensors)", stage.name, count, total, len(names))
    return {"stage": stage.name, "trainable_parameters": count, "total_parameters": total, "trainable": names}


def train_stage(
    adapter: ModelAdapter,
    config: RunConfig,
    stage: Stage,
    samples: list[Sample],
    stage_dir: Path,
    bad_samples: BadSampleLog,
    resume: bool | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Train one stage; returns its summary and, when FSDP sharded the model, its full weights."""
    trainable = apply_freeze(adapter, stage)
    apply_speed(adapter, config.model.speed)
    if trainer_is_main():
        (stage_dir / "trainable.json").write_text(json.dumps(trainable, indent=2))
    defaults = dict(TRAINING_DEFAULTS)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        defaults["use_cpu"] = True  # else Trainer runs each CPU process alone, without DDP
    args = TrainingArguments(
        **{**defaults, "seed": config.seed, **stage.training, "output_dir": str(stage_dir)}
    )
    recorder = MetricsRecorder()
    progress = ProgressBar(stage.name)
    # objective: sft | dpo | grpo picks the Trainer class, its collator and options
    trainer_class, objective_kwargs, collator = objective_parts(adapter, config, stage, samples, bad_samples)
    trainer = trainer_class(
        questions_per_image=(stage.data or config.data).questions_per_image,
        sample_lengths=adapter.sample_lengths,
        on_nonfinite=config.guard.on_nonfinite,
        max_consecutive_skips=config.guard.max_consecutive_skips,
        model=adapter.model,
        args=args,
        train_dataset=SampleDataset(samples),
        data_collator=collator,
        callbacks=[recorder, progress],
        **objective_kwargs,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    checkpoint = None
    if trainer_is_main():
        shutil.rmtree(stage_dir / STAGING, ignore_errors=True)  # a checkpoint a crash left half-written
    if resume is not False:
        found = last_complete_checkpoint(
            stage_dir, needs_optimizer=not args.save_only_model, set_aside=trainer_is_main()
        )
        checkpoint = str(found) if found is not None else None
        if checkpoint is None and (checkpoints(stage_dir) or any(stage_dir.glob("damaged-checkpoint-*"))):
            raise no_complete_checkpoint(stage_dir)
        if resume and checkpoint is None:
            logger.info("no checkpoint in %s; starting from scratch", stage_dir)
        if checkpoint is not None:
            logger.info("stage %s: resuming from %s", stage.name, checkpoint)
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    except Exception as error:
        failure = write_error(error, stage_dir)
        if failure is None:
            raise
        raise failure from None
    finally:
        progress.close()  # so an error message starts on its own line
    summary = {
        "stage": stage.name,
        "objective": stage.objective,
        "global_step": trainer.state.global_step,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "train_samples_per_second": output.metrics.get("train_samples_per_second"),
        "final_loss": next((r["loss"] for r in reversed(recorder.history) if "loss" in r), None),
        "trainable_parameters": trainable["trainable_parameters"],
        "resumed_from": checkpoint,
        "skipped_nonfinite_steps": trainer.skipped_steps,
    }
    if trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2:
        summary["fsdp_units"] = fsdp_units(trainer.model)
        logger.info("stage %s: FSDP units %s", stage.name, summary["fsdp_units"])
    if trainer.is_world_process_zero():
        recorder.write(stage_dir, summary)
    return summary, full_weights(trainer)


def full_weights(trainer: VlmkitTrainer) -> dict[str, torch.Tensor] | None:
    """The whole model's weights when FSDP left them sharded across processes, else None.

    A collective (every process must call it): the main process gets the tensors, on the CPU.
    """
    if not trainer.is_fsdp_enabled:
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def check_merged_turns(config: RunConfig, stages: list[Stage]) -> None:
    """Refuse `turns_per_image` for a family that would not train every merged turn."""
    merged = [
        stage.name for stage in stages if stage.data and stage.data.train and stage.data.train.turns_per_image
    ]
    if not merged or config.model.pretrained is None:
        return  # a composed VLM (model.init) trains merged turns with isolation
    from vlmkit.errors import ConfigError
    from vlmkit.models.adapters import adapter_class, model_type_of

    family = model_type_of(config.model.pretrained)
    if not adapter_class(family).trains_merged_turns:
        raise ConfigError(
            f"data.train.turns_per_image (stage {merged[0]}) is not for {family} models, which train one "
            "question per row; remove it"
        )


def train(
    config: RunConfig, *, resume: bool | None = None, command: str | None = None, accept_changes: bool = False
) -> TrainResult:
    """Run every stage of `config`; returns where the final model and metrics were written.

    The run folder is locked for the run (a second run there refuses), and resume continues only a
    folder whose fingerprint matches this config and data (`accept_changes` overrides that)."""
    from accelerate import PartialState

    from vlmkit.train.orphans import stop_when_orphaned

    stop_when_orphaned()  # a rank whose launcher was killed ends instead of training on alone
    run_dir = config.run_dir()
    lock = None
    try:
        make_run_dir(run_dir)
        if writes_run_files(PartialState()):
            lock = RunLock(run_dir).acquire()
        return _train_run(config, resume=resume, command=command, accept_changes=accept_changes)
    finally:
        if lock is not None:
            lock.release()


def writes_run_files(process: Any) -> bool:
    """Whether this process takes the run lock and writes config.yaml, run.json and the fingerprint.

    The launcher's RANK as well as accelerate's view: before TrainingArguments(use_cpu=True)
    exists, accelerate sees each CPU rank as a main process of its own, and two ranks writing
    these files at once break each other's writes."""
    return int(os.environ.get("RANK", "0")) == 0 and process.is_main_process


def write_model(folder: Path, write: Any, adapter: ModelAdapter) -> None:
    """`write_folder`, with a full disk or a read-only folder as one line (nothing half-written stays)."""
    try:
        write_folder(folder, write)
    except Exception as error:
        failure = write_error(error, folder, state_bytes(adapter.model, optimizer=False))
        if failure is None:
            raise
        raise failure from None


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # one per process: ranks start together
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise CheckpointWriteError(describe_os_error(error, run_dir)) from None


def finished_run(config: RunConfig, run_dir: Path) -> TrainResult:
    """The result of a run that already finished with this config and data: nothing is rewritten."""
    result = TrainResult(run_dir=run_dir, model_dir=run_dir / "model")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result.stages = metrics.get("stages") or [metrics]
    result.bad_samples = metrics.get("bad_samples", 0)
    summary = run_dir / "eval" / "summary.json"
    if config.data.eval is not None and summary.is_file():
        result.eval_summary = json.loads(summary.read_text())
    logger.warning(
        "%s already finished with this config and data; nothing trained or written (model in %s; "
        "pass --no-resume to train it again)",
        run_dir,
        result.model_dir,
    )
    return result


def _train_run(
    config: RunConfig, *, resume: bool | None, command: str | None, accept_changes: bool
) -> TrainResult:
    from accelerate import PartialState

    process = PartialState()  # under `accelerate launch`/torchrun only the main process writes files
    run_dir = config.run_dir()
    set_seed(config.seed)
    stages = config.resolved_stages()
    missing = [stage.name for stage in stages if not (stage.data and stage.data.train)]
    if missing:
        from vlmkit.errors import ConfigError

        where = f" (stage {missing[0]})" if len(stages) > 1 else ""
        raise ConfigError(f"no training data{where}: set data.train (e.g. easyvqa:train)")
    check_merged_turns(config, stages)
    train_sets = [load_samples(stage.data.train) for stage in stages]  # type: ignore[union-attr]
    resolved = config.model_dump(mode="json")
    current = fingerprint(resolved, train_sets)
    recorded = check_resume(run_dir, current, resume=resume, accept_changes=accept_changes)
    done = recorded and recorded.get("finished") and not fingerprint_changes(recorded, current)
    if done and holds_model(run_dir / "model") and (run_dir / "metrics.json").is_file():
        return finished_run(config, run_dir)
    if writes_run_files(process):
        try:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
            (run_dir / "run.json").write_text(json.dumps(run_metadata(config, command), indent=2))
            write_fingerprint(run_dir, current, finished=False)
            if recorded is None:
                (run_dir / "bad_samples.jsonl").unlink(missing_ok=True)  # a fresh run counts afresh
        except OSError as error:
            raise CheckpointWriteError(describe_os_error(error, run_dir)) from None
    process.wait_for_everyone()
    adapter = build_model(config, train_sets if config.model.init is not None else None)
    bad_samples = BadSampleLog(run_dir / "bad_samples.jsonl")
    result = TrainResult(run_dir=run_dir, model_dir=run_dir / "model")
    sharded = False  # whether FSDP trained the last stage (its weights were gathered and written)
    for index, stage in enumerate(stages):
        stage_dir = run_dir if len(stages) == 1 else run_dir / f"{index + 1}-{stage.name}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        finished = stage_dir / "model"
        if len(stages) > 1 and resume is not False and holds_model(finished):
            logger.info("stage %s already finished; continuing from %s", stage.name, finished)
            adapter = load_adapter(finished, **_adapter_kwargs(config))
            result.stages.append(json.loads((stage_dir / "metrics.json").read_text()))
            continue
        samples = train_sets[index]
        summary, weights = train_stage(adapter, config, stage, samples, stage_dir, bad_samples, resume)
        result.stages.append(summary)
        sharded = weights is not None
        if (len(stages) > 1 or sharded) and process.is_main_process:
            check_finite(adapter.model, f"{finished}")
            write_model(finished, functools.partial(adapter.save, state_dict=weights), adapter)
        del weights
        process.wait_for_everyone()
        if sharded and (process.is_main_process or index + 1 < len(stages)):
            # FSDP left the model sharded: go on (next stage, evaluation) from the whole copy
            adapter = load_adapter(finished, **_adapter_kwargs(config))
    if not process.is_main_process:
        return result
    if len(stages) > 1 or not sharded:  # else the one stage's model is written already
        check_finite(adapter.model, f"{result.model_dir}")
        write_model(result.model_dir, adapter.save, adapter)
    result.bad_samples = bad_samples.count()
    if result.bad_samples:
        logger.warning("%d bad samples were skipped; see %s", result.bad_samples, bad_samples.path)
    metrics_path = run_dir / "metrics.json"
    if len(stages) == 1:
        metrics = json.loads(metrics_path.read_text())
        metrics["bad_samples"] = result.bad_samples
    else:
        summaries = [{k: v for k, v in stage.items() if k != "history"} for stage in result.stages]
        metrics = {"stages": summaries, "bad_samples": result.bad_samples}
    metrics_path.write_text(json.dumps(metrics, indent=2))
    if config.data.eval is not None:
        from vlmkit.eval.runner import evaluate

        result.eval_summary = evaluate(
            adapter,
            config.data.eval,
            run_dir / "eval",
            metric=config.eval.metric,
            batch_size=config.eval.batch_size,
            max_new_tokens=config.eval.max_new_tokens,
            prompt_suffix=config.eval.prompt_suffix,
            limit=config.eval.limit,
            model_name=str(result.model_dir),
            command=command,
            on_bad_sample=config.data.on_bad_sample,
            on_mismatch="restart",  # a re-trained model in the same run folder is evaluated afresh
        )
    write_fingerprint(run_dir, current, finished=True)
    return result
