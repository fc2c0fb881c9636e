"""The CLIP run config: `task: clip` at the top tells it apart from a VLM run config.

    task: clip
    model: {config: {projection_dim, logit_scale_init_value, text_config: {...}, vision_config: {...}}}
    tokenizer: {kind: word | bpe, vocab_size, pretrained}
    data: {train: DataSpec, on_bad_sample: skip | fail, caption_choice: random | first}
    loss: {local_loss: false}
    training: {...transformers.TrainingArguments...}
    zeroshot: {tasks: [easyvqa_shape, easyvqa_color]}

Unknown keys are errors, including inside the CLIPConfig sections, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from vlmkit.config import (
    Strict,
    _rename_aliases,
    check_training_values,
    read_config_file,
    read_yaml,
    validate,
)
from vlmkit.data.sources import DataSpec
from vlmkit.models.specs import TokenizerSpec

# Set from the tokenizer so that the text tower pools at the EOS the tokenizer appends.
TOKENIZER_OWNED = ("vocab_size", "eos_token_id", "bos_token_id", "pad_token_id")


def _field_names(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def check_clip_fields(fields: dict[str, Any]) -> None:
    """Raise ValueError naming the first unknown or tokenizer-owned key of a CLIPConfig mapping."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig  # here: only CLIP runs pay for it

    for key in sorted(set(fields) - _field_names(CLIPConfig)):
        raise ValueError(f"unknown CLIPConfig key {key!r}")
    for section, config_class in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
        sub = fields.get(section) or {}
        if not isinstance(sub, dict):
            raise ValueError(f"{section} must be a mapping of {config_class.__name__} fields")
        for key in sorted(set(sub) - _field_names(config_class)):
            raise ValueError(f"unknown {config_class.__name__} key {section}.{key}")
        owned = sorted(set(sub) & set(TOKENIZER_OWNED)) if section == "text_config" else []
        if owned:
            raise ValueError(f"text_config.{owned[0]} is set from the tokenizer; remove it")
    try:
        CLIPConfig(**fields)
    except Exception as exc:  # transformers' strict dataclasses raise their own validation errors
        raise ValueError(f"invalid CLIPConfig: {str(exc).splitlines()[-1].strip()}") from None


class ClipModelSection(Strict):
    """A new CLIP from CLIPConfig fields (`config`), or a saved CLIP folder to continue (`pretrained`)."""

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    image_mean: list[float] = Field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = Field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # Keep this many preprocessed images in memory (a small dataset is then decoded once).
    image_cache_size: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> ClipModelSection:
        if (self.config is None) == (self.pretrained is None):
            raise ValueError(
                "give exactly one of model.config (CLIPConfig fields) or model.pretrained (a folder)"
            )
        if self.config is not None:
            check_clip_fields(self.config)
        return self


class ClipTokenizerSpec(TokenizerSpec):
    """vlmkit's TokenizerSpec; a tokenizer trained from a streamed source reads this many captions."""

    train_captions: int = Field(default=200_000, ge=1)


class ClipDataSection(Strict):
    train: DataSpec
    on_bad_sample: Literal["skip", "fail"] = "skip"
    # A sample's `answers` are all its reference captions (COCO has five): draw one per visit, or
    # always use the first.
    caption_choice: Literal["random", "first"] = "random"
    # Shards (source: webdataset) are streamed; records are shuffled within a buffer this big.
    shuffle_buffer: int = Field(default=1000, ge=0)
    stream: bool | None = None  # default: stream webdataset shards, load everything else


class LossSection(Strict):
    gather: bool = True  # contrast against the global batch across processes
    local_loss: bool = False  # open_clip's local-loss mode (N/W x N logits per rank)


class ZeroShotSection(Strict):
    tasks: list[str] = Field(default_factory=list)  # e.g. easyvqa_shape, cifar10:/data/cifar-10-batches-py
    batch_size: int = Field(default=256, ge=1)


class ClipRunConfig(Strict):
    task: Literal["clip"]
    name: str = "clip"
    seed: int = 0
    output_dir: str | None = None
    model: ClipModelSection
    tokenizer: ClipTokenizerSpec = Field(default_factory=ClipTokenizerSpec)
    data: ClipDataSection
    loss: LossSection = Field(default_factory=LossSection)
    training: dict[str, Any] = Field(default_factory=dict)
    zeroshot: ZeroShotSection = Field(default_factory=ZeroShotSection)

    @field_validator("training")
    @classmethod
    def _check_training_keys(cls, training: dict[str, Any]) -> dict[str, Any]:
        return check_training_values(_rename_aliases(training), "training")

    def run_dir(self) -> Path:
        return Path(self.output_dir or self.training.get("output_dir") or Path("runs") / self.name)

    def streams(self) -> bool:
        return self.data.stream if self.data.stream is not None else self.data.train.source == "webdataset"


def config_task(path: str | Path) -> str:
    """`clip` for a CLIP run config, `vlm` otherwise: what `vlmkit train` dispatches on."""
    try:
        raw = read_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return "vlm"  # let the VLM loader report the problem in its own words
    return str(raw.get("task", "vlm")) if isinstance(raw, dict) else "vlm"


def parse_clip_config(raw: dict[str, Any], source: str = "config") -> ClipRunConfig:
    return validate(ClipRunConfig, raw, source, "docs/clip.md")


def load_clip_config(path: str | Path, overrides: list[str] | None = None) -> ClipRunConfig:
    """Read, override (`key.sub=value`) and validate a CLIP run config."""
    return parse_clip_config(read_config_file(path, overrides), source=str(path))
