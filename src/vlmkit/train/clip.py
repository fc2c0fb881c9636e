"""`vlmkit train` for `task: clip` configs: contrastive pre-training on transformers.Trainer.

Run folder (like the VLM runner's): config.yaml, run.json, checkpoint-N/ (each a loadable CLIP
folder), model/ (the final CLIP: model + tokenizer + image processor), metrics.json, loss.png,
bad_samples.jsonl, zeroshot/<task>/. Under `accelerate launch` every process embeds its share of
the batch and `contrastive_loss` gathers features with gradients, so the loss is the global one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import IterableDataset
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from vlmkit.data.image_cache import ImageCache
from vlmkit.data.images import load_image
from vlmkit.data.sample import Sample
from vlmkit.data.sources import load_samples
from vlmkit.data.sources.captions import caption_of
from vlmkit.errors import ConfigError, DataError, SampleError
from vlmkit.folders import write_folder
from vlmkit.models.clip import ClipBundle, build_clip, load_clip
from vlmkit.models.contrastive import contrastive_loss
from vlmkit.models.tokenizer import train_tokenizer
from vlmkit.train.callbacks import MetricsRecorder, ProgressBar
from vlmkit.train.clip_config import ClipRunConfig, LossSection, load_clip_config
from vlmkit.train.collate import BadSampleLog, SampleDataset
from vlmkit.train.runner import TRAINING_DEFAULTS, run_metadata

__all__ = ["ClipCollator", "ClipTrainer", "load_clip_config", "train_clip"]

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature at 1/100

# CLIP's optimiser settings (Radford et al. 2021): AdamW with beta2 0.98, eps 1e-6, decay 0.2 on
# matrices only, cosine schedule; and no ragged last batch (a 3-pair batch is a noisy step).
CLIP_TRAINING_DEFAULTS: dict[str, Any] = {
    "adam_beta2": 0.98,
    "adam_epsilon": 1e-6,
    "weight_decay": 0.2,
    "lr_scheduler_type": "cosine",
    "dataloader_drop_last": True,
    "ddp_find_unused_parameters": False,  # every parameter, the temperature included, is in the loss
}


# -- data -------------------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Caption Samples streamed from tar shards, epoch after epoch (training stops at max_steps)."""

    def __init__(self, config: ClipRunConfig, bad_samples: BadSampleLog) -> None:
        self.path = config.data.train.path
        self.on_bad_sample = config.data.on_bad_sample
        self.shuffle_buffer = config.data.shuffle_buffer
        self.seed = config.seed
        self.bad_samples = bad_samples

    def __iter__(self) -> Iterator[Sample]:
        from vlmkit.data.shards import iter_shards

        epoch = 0
        while True:
            yielded = 0
            for sample in iter_shards(
                self.path,
                on_bad_sample=self.on_bad_sample,
                on_bad=self.bad_samples.record if epoch == 0 else None,  # count each bad record once
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed + epoch,
            ):
                yielded += 1
                yield sample
            if not yielded:
                raise DataError(f"shards {self.path} hold no usable samples (see {self.bad_samples.path})")
            epoch += 1


class ClipCollator:
    """Samples -> {pixel_values, input_ids, attention_mask}; a bad image follows `on_bad_sample`.

    With `caption_choice: random` each visit draws one of the sample's reference captions
    (torch's RNG, so Trainer's seed and per-worker seeding apply).
    """

    def __init__(
        self,
        bundle: ClipBundle,
        *,
        caption_choice: str = "random",
        on_bad_sample: str = "skip",
        bad_samples: BadSampleLog | None = None,
        cache_size: int = 0,
    ) -> None:
        self.bundle = bundle
        self.caption_choice = caption_choice
        self.on_bad_sample = on_bad_sample
        self.bad_samples = bad_samples
        self._pixels: ImageCache[torch.Tensor] = ImageCache(cache_size)

    def caption(self, sample: Sample) -> str:
        if self.caption_choice == "random" and len(sample.answers) > 1:
            return sample.answers[int(torch.randint(len(sample.answers), ()).item())]
        return caption_of(sample)

    def _bad(self, error: SampleError) -> None:
        if self.on_bad_sample == "fail":
            raise DataError(
                f"{error} (or set data.on_bad_sample: skip to skip and count such samples)"
            ) from None
        logger.warning("skipping %s", error)
        if self.bad_samples is not None:
            self.bad_samples.record(error)

    def pixels(self, samples: list[Sample]) -> list[torch.Tensor | None]:
        """Per sample its (3, H, W) pixels, or None when its image is bad; cached by path or key."""
        out: list[torch.Tensor | None] = [None] * len(samples)
        todo, images = [], []
        for index, sample in enumerate(samples):
            cached = self._pixels.get(self._pixels.key(sample.image))
            if cached is not None:
                out[index] = cached
                continue
            try:
                if sample.image is None:
                    raise DataError("no image")
                images.append(load_image(sample.image))
                todo.append(index)
            except DataError as exc:
                self._bad(SampleError(sample.id, str(exc)))
        if images:  # one image-processor call for the batch's new images
            processed = self.bundle.image_processor(images=images, return_tensors="pt")["pixel_values"]
            for index, tensor in zip(todo, processed, strict=True):
                out[index] = tensor
                self._pixels.put(self._pixels.key(samples[index].image), tensor)
        return out

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        pixels = self.pixels(samples)
        kept = [(p, s) for p, s in zip(pixels, samples, strict=True) if p is not None]
        if not kept:
            raise DataError("every sample of a batch was bad; check the data source")
        text = self.bundle.encode_text([self.caption(s) for _, s in kept])
        return {"pixel_values": torch.stack([p for p, _ in kept]), **text}


# -- trainer ----------------------------------------------------------------------------------------
class ClipTrainer(Trainer):
    """Trainer whose loss is the (global) contrastive loss; no weight decay on gains, biases or
    the temperature (open_clip's rule: only parameters with >= 2 dimensions decay)."""

    def __init__(self, *args: Any, loss: LossSection | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_options = loss or LossSection()
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs: divide by GA steps

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(**inputs)  # CLIPOutput with L2-normalised image_embeds / text_embeds
        scale = self.accelerator.unwrap_model(model).logit_scale.exp()
        loss = contrastive_loss(
            outputs.image_embeds,
            outputs.text_embeds,
            scale,
            gather=self.loss_options.gather,
            local_loss=self.loss_options.local_loss,
        )
        return (loss, outputs) if return_outputs else loss

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["logit_scale"] = round(
                self.accelerator.unwrap_model(self.model).logit_scale.detach().exp().item(), 4
            )
        super().log(logs, start_time)


class ClampLogitScale(TrainerCallback):
    """Keep 1/temperature in [1, 100] after every optimiser step, as CLIP does."""

    def on_step_end(
        self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **_: Any
    ) -> None:
        if model is not None:
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


class SaveImageProcessor(TrainerCallback):
    """Put the image processor beside each checkpoint's weights and tokenizer: a loadable CLIP folder."""

    def __init__(self, bundle: ClipBundle) -> None:
        self.bundle = bundle

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            self.bundle.image_processor.save_pretrained(checkpoint)


# -- the run ------------------------------------------------------------------------------------------
def _caption_texts(samples: list[Sample]) -> list[str]:
    return [caption for sample in samples for caption in (sample.answers or [caption_of(sample)])]


def _streamed_texts(config: ClipRunConfig) -> list[str]:
    from vlmkit.data.shards import iter_shards

    stream = iter_shards(config.data.train.path, on_bad_sample="skip")
    return _caption_texts(list(islice(stream, config.tokenizer.train_captions)))


def _learnt_tokenizer(config: ClipRunConfig, texts: Any, args: TrainingArguments) -> Any:
    """Learn the vocabulary; with several processes the main one learns it and the others load it,
    so every rank maps words to the same ids."""
    spec = config.tokenizer
    if args.world_size == 1:
        return train_tokenizer(texts(), kind=spec.kind, vocab_size=spec.vocab_size, lowercase=spec.lowercase)
    shared = Path(args.output_dir) / "tokenizer"
    with args.main_process_first(desc="learning the tokenizer"):
        if args.process_index == 0:
            tokenizer = train_tokenizer(
                texts(), kind=spec.kind, vocab_size=spec.vocab_size, lowercase=spec.lowercase
            )
            tokenizer.save_pretrained(shared)
        else:
            tokenizer = AutoTokenizer.from_pretrained(shared)
    return tokenizer


def build_bundle(
    config: ClipRunConfig, texts: Any, checkpoint: str | None, args: TrainingArguments
) -> ClipBundle:
    """The CLIP to train: a saved one, or a new one whose tokenizer is pretrained or learnt from `texts`."""
    if config.model.pretrained:
        return load_clip(config.model.pretrained)
    if checkpoint is not None:  # the vocabulary those weights were trained with
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    elif config.tokenizer.pretrained:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer.pretrained)
    else:
        tokenizer = _learnt_tokenizer(config, texts, args)
    return build_clip(
        config.model.config or {},
        tokenizer,
        image_mean=config.model.image_mean,
        image_std=config.model.image_std,
    )


def training_arguments(config: ClipRunConfig, run_dir: Path) -> TrainingArguments:
    """vlmkit's and CLIP's defaults, then the config's `training:` section."""
    defaults = {**TRAINING_DEFAULTS, **CLIP_TRAINING_DEFAULTS, "seed": config.seed}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        defaults["use_cpu"] = True  # torchrun on CPUs: accelerate only sets up gloo DDP when told so
    return TrainingArguments(**{**defaults, **config.training, "output_dir": str(run_dir)})


def train_clip(config: ClipRunConfig, *, resume: bool | None = None, command: str | None = None) -> Path:
    """Train CLIP as configured; returns the run folder (the model is in RUN/model)."""
    from vlmkit.train.orphans import stop_when_orphaned

    stop_when_orphaned()  # a rank whose launcher was killed ends instead of training on alone
    run_dir = config.run_dir()
    if config.streams() and int(config.training.get("max_steps", -1)) <= 0:
        raise ConfigError("streamed shards have no length: set training.max_steps (optimizer steps to run)")
    args = training_arguments(config, run_dir)  # first: it sets up the process group, if any
    main = args.process_index == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = get_last_checkpoint(str(run_dir)) if resume is not False else None
    if resume and checkpoint is None:
        logger.info("no checkpoint in %s; starting from scratch", run_dir)
    bad_samples = BadSampleLog(run_dir / "bad_samples.jsonl")
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        (run_dir / "run.json").write_text(
            json.dumps({"task": "clip", **run_metadata(config, command)}, indent=2)
        )
        if checkpoint is None:
            bad_samples.path.unlink(missing_ok=True)
    set_seed(config.seed)

    if config.streams():
        dataset: Any = ShardStream(config, bad_samples)
        bundle = build_bundle(config, lambda: _streamed_texts(config), checkpoint, args)
    else:
        samples = load_samples(config.data.train)
        dataset = SampleDataset(samples)
        bundle = build_bundle(config, lambda: _caption_texts(samples), checkpoint, args)
    logger.info("CLIP with %d parameters", sum(p.numel() for p in bundle.model.parameters()))

    if args.gradient_accumulation_steps > 1:
        logger.warning(
            "gradient_accumulation_steps > 1 contrasts each micro-batch only with itself; "
            "raise the per-device batch or add processes for a larger contrastive batch"
        )
    recorder = MetricsRecorder()
    progress = ProgressBar("clip")
    collator = ClipCollator(
        bundle,
        caption_choice=config.data.caption_choice,
        on_bad_sample=config.data.on_bad_sample,
        bad_samples=bad_samples,
        cache_size=config.model.image_cache_size,
    )
    trainer = ClipTrainer(
        model=bundle.model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=bundle.tokenizer,
        callbacks=[recorder, progress, ClampLogitScale(), SaveImageProcessor(bundle)],
        loss=config.loss,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        progress.close()
    if not trainer.is_world_process_zero():
        return run_dir

    write_folder(run_dir / "model", bundle.save)
    summary: dict[str, Any] = {
        "task": "clip",
        "global_step": trainer.state.global_step,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "train_samples_per_second": output.metrics.get("train_samples_per_second"),
        "final_loss": next((r["loss"] for r in reversed(recorder.history) if "loss" in r), None),
        "logit_scale": bundle.model.logit_scale.detach().exp().item(),
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
        "world_size": args.world_size,
        "resumed_from": checkpoint,
        "bad_samples": bad_samples.count(),
        "zeroshot": {},
    }
    if summary["bad_samples"]:
        logger.warning("%d bad samples were skipped; see %s", summary["bad_samples"], bad_samples.path)
    if config.zeroshot.tasks:
        from vlmkit.eval.zeroshot import zeroshot_eval

        for task in config.zeroshot.tasks:
            out = run_dir / "zeroshot" / task.split(":")[0]
            result = zeroshot_eval(bundle, task, out, batch_size=config.zeroshot.batch_size, command=command)
            summary["zeroshot"][result["data"]] = {
                "top1": result["top1"],
                "top5": result["top5"],
                "n": result["n"],
            }
    recorder.write(run_dir, summary)
    return run_dir
