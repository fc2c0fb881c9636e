"""Run configs: one YAML file -> validated pydantic models. Unknown keys are errors.

The `training:` section is handed to `transformers.TrainingArguments` unchanged, so the seeds'
hyperparameter tables map onto it key for key; its keys, value types and enum choices are checked
against that dataclass (through `vlmkit.hf_schema`: no torch or transformers import), so a
broken config fails in one line in well under a second.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlmkit.data.sources import DataSpec
from vlmkit.errors import ConfigError
from vlmkit.hf_schema import training_fields
from vlmkit.models.specs import VLMSpec
from vlmkit.train.objectives.options import DPOOptions, GRPOOptions, Objective

M = TypeVar("M", bound=BaseModel)

# Keys older transformers (and the seeds' tables) use, mapped to their transformers 5 names.
TRAINING_ALIASES = {"warmup_ratio": "warmup_steps"}
# Ranges TrainingArguments leaves to the optimiser or the data loader to fail on, deep in a run.
TRAINING_MINIMUMS: dict[str, tuple[float, bool]] = {  # key: (bound, bound allowed)
    "learning_rate": (0, True),
    "weight_decay": (0, True),
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "num_train_epochs": (0, False),
    "warmup_steps": (0, True),
    "max_grad_norm": (0, True),
    "adam_epsilon": (0, False),
}
TYPE_NAMES = {"bool": "true/false", "int": "an integer", "float": "a number", "str": "text", "null": "null"}


def check_training_values(section: dict[str, Any], where: str) -> dict[str, Any]:
    """Unknown keys, wrong value types, unknown enum values (`lr_scheduler_type: cosin`) and
    out-of-range numbers are one-line errors; a number written as text that YAML 1.1 reads as
    a string (`2e-5`) is converted. Returns the section with those conversions."""
    fields = training_fields()
    unknown = sorted(set(section) - set(fields))
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, fields, 1)) else k
                 for k in unknown]  # fmt: skip
        raise ValueError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in hints)}: "
            "`training` takes transformers.TrainingArguments fields"
        )
    checked = dict(section)
    for key, value in section.items():
        checked[key] = _training_value(f"{where}.{key}", value, fields[key], key)
    return checked


def _training_value(name: str, value: Any, entry: dict[str, Any], key: str) -> Any:
    kinds, choices = entry.get("types"), entry.get("choices")
    if isinstance(value, str) and choices:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, 1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{name}: {value!r} is not a choice; {hint}choose one of {', '.join(choices)}")
        return value
    if kinds is not None:
        value = _coerced(name, value, kinds)
    bound = TRAINING_MINIMUMS.get(key)
    if bound is not None and isinstance(value, int | float) and not isinstance(value, bool):
        low, inclusive = bound
        if value < low or (value == low and not inclusive):
            relation = "at least" if inclusive else "more than"
            raise ValueError(f"{name}: {value} must be {relation} {low}")
    return value


def _coerced(name: str, value: Any, kinds: list[str]) -> Any:
    if value is None:
        if "null" in kinds:
            return value
    elif isinstance(value, bool):
        if "bool" in kinds:
            return value
    elif isinstance(value, int):
        if "int" in kinds or "float" in kinds:
            return value
    elif isinstance(value, float):
        if "float" in kinds:
            return value
        if "int" in kinds and value.is_integer():
            return int(value)
    elif isinstance(value, str):
        if "str" in kinds:
            return value
        if "float" in kinds:
            try:
                return float(value)  # 2e-5: YAML 1.1 reads a number without a dot as text
            except ValueError:
                pass
        if "int" in kinds and value.strip().lstrip("-").isdigit():
            return int(value)
    wanted = " or ".join(TYPE_NAMES[k] for k in kinds if k != "null")
    raise ValueError(f"{name}: {value!r} is not {wanted}")


def _rename_aliases(training: dict[str, Any]) -> dict[str, Any]:
    renamed = dict(training)
    for old, new in TRAINING_ALIASES.items():
        if old in renamed and old not in training_fields():
            if new in renamed:
                raise ValueError(f"give training.{new} or training.{old}, not both")
            renamed[new] = renamed.pop(old)
    return renamed


class YamlLoader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2's scalars: `1e-3` is a float (YAML 1.1 would make it a string) and
    only true/false are booleans, so `save_strategy: no` is the string TrainingArguments wants
    (YAML 1.1 reads no/yes/on/off as booleans)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSpec(Strict):
    """LoRA through peft; `target_modules: all-linear` adapts every linear layer of the LM."""

    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    vision: bool = False  # also adapt the vision tower's linear layers
    projector: bool = False  # also adapt the projector
    modules_to_save: list[str] | None = None


class QuantizationSpec(Strict):
    """bitsandbytes loading (QLoRA: 4-bit nf4, double quantisation, bf16 compute)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


AttentionKernel = Literal["eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"]


class SpeedSpec(Strict):
    """Speed/memory levers vlmkit owns (docs/performance.md); Trainer's own are `training:` keys."""

    # transformers families: vocabulary logits only where a label is (vlmkit's own VLM always does this).
    labelled_loss: bool = True
    # liger-kernel fused linear cross-entropy for that loss; used on CUDA when liger-kernel imports.
    fused_cross_entropy: bool = False
    # Keep a frozen vision tower's outputs per image so later epochs skip the tower (vlmkit VLM).
    vision_feature_cache: bool = False
    vision_feature_cache_gib: float = Field(default=8.0, gt=0)
    vision_feature_cache_device: Literal["model", "cpu"] = "model"
    # Generation: a static (pre-allocated) KV cache, and torch.compile of the decoding step on top.
    generation_cache: Literal["dynamic", "static"] = "dynamic"
    compile_generation: bool = False
    # The language model's attention kernel; unset keeps the family's default (sdpa, or eager
    # for Gemma 2, whose attention soft-capping sdpa cannot apply).
    attention: AttentionKernel | None = None

    @model_validator(mode="after")
    def _compatible(self) -> SpeedSpec:
        if self.compile_generation and self.generation_cache != "static":
            raise ValueError("compile_generation needs generation_cache: static (a fixed-shape KV cache)")
        if self.fused_cross_entropy:
            from vlmkit.models.loss import liger_available

            if not liger_available():
                raise ValueError(
                    "fused_cross_entropy needs liger-kernel (pip install 'vlmkit[speed]'); set it to false"
                )
        return self


class ModelSection(Strict):
    """Compose a new VLM (`init`) or start from a saved / pretrained model (`pretrained`)."""

    init: VLMSpec | None = None
    pretrained: str | None = None
    max_length: int | None = Field(default=None, ge=8)
    image_cache_size: int = Field(default=0, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None
    # Family-specific adapter settings (e.g. Qwen2-VL min_pixels / max_pixels, PaliGemma prompt prefix).
    adapter_options: dict[str, Any] = Field(default_factory=dict)
    speed: SpeedSpec = Field(default_factory=SpeedSpec)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.init is None) == (self.pretrained is None):
            raise ValueError(
                "give exactly one of model.init (compose a new VLM) or model.pretrained (a folder)"
            )
        return self


class Freeze(Strict):
    """Which parts keep their weights fixed in a stage."""

    vision: bool = False
    projector: bool = False
    lm: bool = False


class DataSection(Strict):
    train: DataSpec | None = None
    eval: DataSpec | None = None
    on_bad_sample: Literal["skip", "fail"] = "fail"
    # Batch questions about one image in chunks of this many, so a training tower runs once per
    # image. It costs batch diversity; a frozen tower with model.speed.vision_feature_cache gains
    # nothing from it (docs/recipes.md).
    questions_per_image: int | None = Field(default=None, ge=1)


class EvalSection(Strict):
    metric: str | None = None
    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)  # None: the data source's default
    prompt_suffix: str | None = None  # None: the data source's default instruction
    limit: int | None = Field(default=None, ge=1)


class GuardSection(Strict):
    """What a NaN/inf loss or gradient norm does: stop the run, or skip that optimiser step."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    # With `skip`: this many skipped steps in a row mean the run has diverged, and it stops.
    max_consecutive_skips: int = Field(default=5, ge=1)


class Stage(Strict):
    """One step of a staged recipe; unset fields inherit the run's top-level sections."""

    name: str
    freeze: Freeze | None = None
    data: DataSection | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    # The stage's objective and its options (unset: the run's); docs/recipes.md.
    objective: Objective | None = None
    dpo: DPOOptions | None = None
    grpo: GRPOOptions | None = None


class RunConfig(Strict):
    name: str = "run"
    seed: int = 0
    output_dir: str | None = None
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    freeze: Freeze = Field(default_factory=Freeze)
    training: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSection = Field(default_factory=EvalSection)
    guard: GuardSection = Field(default_factory=GuardSection)
    # sft: next-token loss on the answer; dpo / grpo: preference / reinforcement fine-tuning.
    objective: Objective = "sft"
    dpo: DPOOptions | None = None
    grpo: GRPOOptions | None = None
    stages: list[Stage] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_training_keys(self) -> RunConfig:
        self.training = _rename_aliases(self.training)
        for stage in self.stages:
            stage.training = _rename_aliases(stage.training)
        self.training = check_training_values(self.training, "training")
        for stage in self.stages:
            stage.training = check_training_values(stage.training, f"stages[{stage.name}].training")
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"stage name(s) {', '.join(map(repr, repeated))} used twice: stages are addressed "
                "(and their run folders named) by name; give each a name of its own"
            )
        for stage in self.resolved_stages():
            frozen = stage.freeze or Freeze()
            if frozen.vision and frozen.projector and frozen.lm and self.model.lora is None:
                where = f"stage {stage.name}" if self.stages else "the run"
                raise ValueError(
                    f"{where} freezes the vision tower, the projector and the LM, and adds no LoRA: "
                    "nothing would train; unfreeze a part or set model.lora"
                )
            if stage.data is not None and stage.data.eval is not None and stage.data.eval.turns_per_image:
                raise ValueError(
                    "data.eval.turns_per_image: evaluation asks one question per sample; "
                    "merge questions in data.train only"
                )
            strategy = stage.training.get("train_sampling_strategy", "random")
            if strategy == "batch_rebalance":
                raise ValueError(
                    "training.train_sampling_strategy: batch_rebalance is not supported; "
                    "use group_by_length (batches of similar length) or random"
                )
            if strategy == "group_by_length" and stage.data is not None and stage.data.questions_per_image:
                raise ValueError(
                    "data.questions_per_image and training.train_sampling_strategy: group_by_length "
                    "both choose the batches; keep one"
                )
        self._check_objectives()
        return self

    def _check_objectives(self) -> None:
        """Options for an objective no stage runs would be silently ignored: refuse them."""
        used = {stage.objective for stage in self.resolved_stages()}
        places = [(name, getattr(self, name), name in used) for name in ("dpo", "grpo")]
        for stage in self.stages:
            objective = stage.objective or self.objective
            places += [
                (f"stages[{stage.name}].{n}", getattr(stage, n), n == objective) for n in ("dpo", "grpo")
            ]
        for where, options, runs in places:
            if options is not None and not runs:
                name = where.rsplit(".", 1)[-1]
                raise ValueError(
                    f"{where} is set but no stage it applies to has objective: {name}; "
                    f"set objective: {name} or remove {where}"
                )

    def run_dir(self) -> Path:
        return Path(self.output_dir or self.training.get("output_dir") or Path("runs") / self.name)

    def resolved_stages(self) -> list[Stage]:
        """Every stage with inherited sections filled in; a config without `stages` is one stage."""
        if not self.stages:
            return [
                Stage(
                    name="train",
                    freeze=self.freeze,
                    data=self.data,
                    training=dict(self.training),
                    objective=self.objective,
                    dpo=self.dpo or (DPOOptions() if self.objective == "dpo" else None),
                    grpo=self.grpo or (GRPOOptions() if self.objective == "grpo" else None),
                )
            ]
        resolved = []
        for stage in self.stages:
            objective = stage.objective or self.objective
            dpo = stage.dpo or self.dpo or DPOOptions()
            grpo = stage.grpo or self.grpo or GRPOOptions()
            resolved.append(
                Stage(
                    name=stage.name,
                    freeze=stage.freeze or self.freeze,
                    data=stage.data or self.data,
                    training={**self.training, **stage.training},
                    objective=objective,
                    dpo=dpo if objective == "dpo" else None,
                    grpo=grpo if objective == "grpo" else None,
                )
            )
        return resolved


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML (numbers, bools, lists).

    A list of named items (the `stages`) is addressed by name or index:
    `stages.vqa.training.num_train_epochs=3` or `stages.2.training.num_train_epochs=3`.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set training.max_steps=2)")
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = list_item(node, part, item)
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, dict | list):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        if isinstance(node, list):
            raise ConfigError(f"--set {item!r}: name an item of the list, then its key")
        try:
            node[parts[-1]] = read_yaml(value)
        except yaml.YAMLError:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML; quote it (--set '{key}=\"...\"') "
                "or fix its brackets"
            ) from None
    return raw


def list_item(items: list[Any], part: str, item: str) -> dict[str, Any]:
    """The item of a config list that `part` names: its `name`, or its index."""
    names = [entry.get("name") for entry in items if isinstance(entry, dict)]
    if part.isdigit() and int(part) < len(items):
        found = items[int(part)]
    elif part in names:
        found = next(e for e in items if isinstance(e, dict) and e.get("name") == part)
    else:
        raise ConfigError(
            f"--set {item!r}: no item {part!r}; name one of {', '.join(map(str, names)) or '(none)'} "
            f"or an index below {len(items)}"
        )
    if not isinstance(found, dict):
        raise ConfigError(f"--set {item!r}: item {part!r} is not a section")
    return found


def validate(model: type[M], raw: dict[str, Any], source: str, docs: str) -> M:
    """Validate `raw` as `model`; the first problem becomes one line naming its key."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown key; remove it or check its spelling in {docs}"
        raise ConfigError(f"{source}: {where}: {message}") from None


def read_config_file(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A config file's mapping with `--set` overrides applied; bad files are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, data, training, ...)")
    return apply_overrides(raw, overrides or [])


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    return validate(RunConfig, raw, source, "docs/recipes.md")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return parse_config(read_config_file(path, overrides), source=str(path))
