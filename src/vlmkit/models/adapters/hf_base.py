"""Shared machinery of the adapters for transformers' own VLM families (PaliGemma, Qwen2-VL, LLaVA).

A family adapter says how a Sample becomes token ids + labels (its prompt convention) and which
image tensors its forward takes; loading (dtype, 4-bit), saving (plain or LoRA), the pixel cache,
padding (right for training, left for generation) and stop tokens live here once.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

from vlmkit.data.images import image_key, load_image
from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError, ModelLoadError, SampleError
from vlmkit.models.adapters.base import Batch, ModelAdapter
from vlmkit.models.attention import keep_softcapping
from vlmkit.models.chat_encoding import IGNORE_INDEX, assistant_spans

logger = logging.getLogger(__name__)

#: written next to LoRA weights: which base model they adapt and with which adapter.
BASE_POINTER_FILE = "vlmkit_base.json"


@dataclass
class Row:
    """One encoded sample before padding."""

    input_ids: list[int]
    labels: list[int] | None
    images: dict[str, torch.Tensor]
    token_types: dict[str, list[int]] = field(default_factory=dict)  # per-token extras, padded with 0


class HFVisionAdapter(ModelAdapter):
    """Base of the transformers-family adapters; subclasses implement `encode_one`."""

    #: model_type -> transformers class name (exact model_type, never a substring of a name).
    model_classes: ClassVar[dict[str, str]] = {}
    #: adapter options this family understands (model.adapter_options), with their defaults.
    options: ClassVar[dict[str, Any]] = {}
    #: "stack": one [C, H, W] pixel tensor per row; "cat": rows of patches joined along dim 0 (Qwen2-VL).
    image_combine: ClassVar[str] = "stack"

    def __init__(
        self,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        processor: Any | None = None,
        *,
        max_length: int | None = None,
        image_cache_size: int = 0,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(
                f"model.adapter_options {', '.join(unknown)} not understood by the {type(self).__name__} "
                f"(it takes: {known})"
            )
        self.model = model
        keep_softcapping(model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor
        self.max_length = max_length
        self.settings = {**self.options, **options}
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = image_cache_size
        self.configure()

    def configure(self) -> None:
        """Family hook run after construction (e.g. apply image-resolution options)."""

    # -- loading and saving ----------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
        image_cache_size: int = 0,
        quantization: Any = None,
        processor_path: str | Path | None = None,
        **options: Any,
    ) -> HFVisionAdapter:
        """Load from a folder or hub id; `quantization` (a QuantizationSpec) loads 4/8-bit weights."""
        if Path(path).exists():  # absolute, so a LoRA folder's pointer to this base stays valid
            path = str(Path(path).resolve())
        try:
            config = AutoConfig.from_pretrained(path)
        except OSError as exc:
            raise ModelLoadError(f"{path} is not a model folder or reachable hub id ({exc})") from None
        if config.model_type not in cls.model_classes:
            raise ModelLoadError(f"{cls.__name__} does not serve model type {config.model_type!r}")
        model_class = getattr(transformers, cls.model_classes[config.model_type])
        kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
        if quantization is not None:
            from vlmkit.train.peft import bnb_config

            kwargs["quantization_config"] = bnb_config(quantization)
            kwargs["dtype"] = dtype or getattr(torch, quantization.compute_dtype)
            kwargs["device_map"] = {"": device or ("cuda" if torch.cuda.is_available() else "cpu")}
        try:
            model = model_class.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise ModelLoadError(
                f"{path} is not a complete {config.model_type} model folder ({exc})"
            ) from None
        if device and quantization is None:
            model.to(device)
        tokenizer, image_processor, processor = load_processing(processor_path or path)
        return cls(
            model,
            tokenizer,
            image_processor,
            processor,
            max_length=max_length,
            image_cache_size=image_cache_size,
            **options,
        )

    def save(self, out_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Full model folder, or for a LoRA-wrapped model the adapter weights + a base pointer.

        Either way the tokenizer, image processor and chat template are written beside it, so the
        folder alone is enough to load (the base weights come from the pointer).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, state_dict=state_dict)
        if is_peft_model(self.model):
            base = self.model.peft_config["default"].base_model_name_or_path
            pointer = {"base_model": base, "model_type": self.model.get_base_model().config.model_type}
            (out / BASE_POINTER_FILE).write_text(json.dumps(pointer, indent=2))
        save_processing(out, self.tokenizer, self.image_processor, self.processor)

    # -- images --------------------------------------------------------------------------------
    def image_tensors(self, sample: Sample) -> dict[str, torch.Tensor]:
        """The image processor's tensors for one sample (cached by path when image_cache_size > 0)."""
        key = image_key(sample.image) if self._cache_size else None
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if sample.image is None:
            raise SampleError(sample.id, "has no image; this model family needs one per sample")
        try:
            image = load_image(sample.image)
        except Exception as exc:
            raise SampleError(sample.id, str(exc)) from None
        processed = self.image_processor(images=image, return_tensors="pt")
        tensors = {name: value for name, value in processed.items() if isinstance(value, torch.Tensor)}
        if self.image_combine == "stack":
            tensors = {name: value[0] for name, value in tensors.items()}
        if key is not None:
            self._cache[key] = tensors
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tensors

    # -- encoding --------------------------------------------------------------------------------
    def encode_one(self, sample: Sample, train: bool) -> Row:
        raise NotImplementedError

    def check_length(self, row: Row, sample: Sample) -> Row:
        if self.max_length is not None and len(row.input_ids) > self.max_length:
            raise SampleError(
                sample.id,
                f"{len(row.input_ids)} tokens exceed max_length {self.max_length}; raise model.max_length "
                "(truncating would drop answer tokens)",
            )
        return row

    def encode(self, samples: Sequence[Sample], *, train: bool = True) -> Batch:
        rows = []
        for sample in samples:
            if train and not any(m["role"] == "assistant" for m in sample.messages):
                raise SampleError(sample.id, "has no assistant turn to learn from")
            rows.append(self.check_length(self.encode_one(sample, train), sample))
        batch = {**pad_rows(rows, self.pad_token_id(), left_pad=not train), **self.combine_images(rows)}
        dtype = model_float_dtype(self.model)
        if "pixel_values" in batch and dtype is not None:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return batch

    def combine_images(self, rows: list[Row]) -> Batch:
        names = rows[0].images.keys()
        join = torch.stack if self.image_combine == "stack" else torch.cat
        return {name: join([row.images[name] for row in rows]) for name in names}

    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def stop_token_ids(self) -> list[int]:
        stops = set(super().stop_token_ids())
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        return sorted(stops)


def pad_rows(rows: list[Row], pad_id: int, left_pad: bool) -> Batch:
    """Pad to one length: right for training (labels -100 there), left for generation."""
    width = max(len(row.input_ids) for row in rows)
    size = (len(rows), width)
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(size, dtype=torch.long)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
    extras = {name: torch.zeros(size, dtype=torch.long) for name in rows[0].token_types}
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        input_ids[i, cols] = torch.tensor(row.input_ids)
        attention_mask[i, cols] = 1
        if row.labels is not None:
            labels[i, cols] = torch.tensor(row.labels)
        for name, values in row.token_types.items():
            extras[name][i, cols] = torch.tensor(values)
    batch: Batch = {"input_ids": input_ids, "attention_mask": attention_mask, **extras}
    if rows[0].labels is not None:
        batch["labels"] = labels
    return batch


def model_float_dtype(model: Any) -> torch.dtype | None:
    """The dtype image tensors must have: the vision tower's first floating weight."""
    for parameter in model.parameters():
        if parameter.dtype.is_floating_point:
            return parameter.dtype
    return None


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is in the train extra
        return False
    return isinstance(model, PeftModel)


def load_processing(path: str | Path) -> tuple[PreTrainedTokenizerBase, Any, Any | None]:
    """Tokenizer, image processor and (where it can be built) the family's processor.

    Qwen2-VL's processor insists on a video processor, which needs torchvision; the tokenizer and
    image processor are loaded on their own then, which is all the adapters use.
    """
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        logger.debug("no processor for %s (%s); loading tokenizer and image processor", path, exc)
        processor = None
    if processor is not None and hasattr(processor, "tokenizer") and hasattr(processor, "image_processor"):
        return processor.tokenizer, processor.image_processor, processor
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"{path} has no tokenizer or image processor ({exc})") from None
    return tokenizer, image_processor, None


def save_processing(
    out: Path, tokenizer: PreTrainedTokenizerBase, image_processor: Any, processor: Any | None
) -> None:
    """Write tokenizer, image processor and chat template (via the processor when there is one)."""
    if processor is not None:
        processor.save_pretrained(out)
    else:
        tokenizer.save_pretrained(out)
        image_processor.save_pretrained(out)
    if tokenizer.chat_template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)


# -- chat-template encoding shared by the chat families -------------------------------------------
def needs_special_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether tokenizing should let the tokenizer add BOS (it does unless the template already did)."""
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    train: bool,
    end_of_turn: set[int],
) -> tuple[list[int], list[int] | None]:
    """Token ids (+ labels when training) of a chat rendered by the tokenizer's chat template.

    Labels cover each assistant turn's characters (from `assistant_spans`, which asserts the
    template's prefix invariant). A template that closes assistant turns without an end-of-turn
    token (LLaVA-1.5's ends them with a space) gets EOS appended to each turn, labelled, so the
    model learns to stop; this matches LLaVA's own training format (`ASSISTANT: answer</s>`).
    """
    if not train:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=needs_special_tokens(tokenizer, text))["input_ids"]
        return list(ids), None
    text, spans = assistant_spans(tokenizer, messages)  # type: ignore[arg-type]
    encoded = tokenizer(
        text, add_special_tokens=needs_special_tokens(tokenizer, text), return_offsets_mapping=True
    )
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    turn_ends: list[int] = []
    for span_start, span_end in spans:
        # A token belongs to the turn if it starts inside it; one that runs past the end (a merge
        # with the template's trailing space) is kept so the whole answer is learnt.
        inside = [
            i
            for i, (start, end) in enumerate(encoded["offset_mapping"])
            if end > start and span_start <= start < span_end
        ]
        if not inside:
            raise ValueError("an assistant turn tokenized to no labelled tokens")
        for i in inside:
            labels[i] = ids[i]
        turn_ends.append(inside[-1])
    eos = tokenizer.eos_token_id
    for last in reversed(turn_ends):
        if ids[last] not in end_of_turn and eos is not None:
            ids.insert(last + 1, eos)
            labels.insert(last + 1, eos)
    return ids, labels


def template_end_of_turn(tokenizer: PreTrainedTokenizerBase, to_messages: Any) -> set[int]:
    """Special tokens that close an assistant turn in this template (Qwen: <|im_end|>)."""
    probe = to_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    text, spans = assistant_spans(tokenizer, probe)
    start, end = spans[0]
    ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    stops = {token for token in ids if token in special}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return stops


def expand_token(
    ids: list[int], labels: list[int] | None, token_id: int, counts: list[int], sample_id: str
) -> tuple[list[int], list[int] | None, list[int]]:
    """Repeat each image placeholder to its number of image features; returns a 0/1 image mask too."""
    positions = [i for i, token in enumerate(ids) if token == token_id]
    if len(positions) != len(counts):
        raise SampleError(sample_id, f"expected {len(counts)} image placeholder(s), found {len(positions)}")
    out_ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    mask: list[int] = []
    previous = 0
    for at, count in zip(positions, counts, strict=True):
        out_ids += ids[previous:at] + [token_id] * count
        mask += [0] * (at - previous) + [1] * count
        if out_labels is not None and labels is not None:
            out_labels += labels[previous:at] + [IGNORE_INDEX] * count
        previous = at + 1
    out_ids += ids[previous:]
    mask += [0] * (len(ids) - previous)
    if out_labels is not None and labels is not None:
        out_labels += labels[previous:]
    return out_ids, out_labels, mask


def assert_label_invariants(ids: list[int], labels: list[int], forbidden: set[int], sample_id: str) -> None:
    """Labels equal their input ids where set, and never fall on image / padding positions."""
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            continue
        if label != token or token in forbidden:
            raise AssertionError(f"sample {sample_id!r}: label mask broken at token {token} (label {label})")
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError(sample_id, "no answer token survived encoding")
