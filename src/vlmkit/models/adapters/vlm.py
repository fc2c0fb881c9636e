"""Adapter for vlmkit's own VisionLanguageModel."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, BaseImageProcessor, PreTrainedTokenizerBase

from vlmkit.data.conversations import INDEPENDENT_TURNS
from vlmkit.data.image_cache import ImageCache
from vlmkit.data.images import image_key, load_image
from vlmkit.data.sample import Message, Sample
from vlmkit.errors import ConfigError, ModelLoadError, SampleError
from vlmkit.models.adapters.base import Batch, ModelAdapter
from vlmkit.models.adapters.hf_base import BASE_POINTER_FILE, is_peft_model
from vlmkit.models.attention import keep_softcapping
from vlmkit.models.chat_encoding import IGNORE_INDEX, encode_chat, end_of_turn_ids
from vlmkit.models.tokenizer import IMAGE_TOKEN
from vlmkit.models.turn_isolation import isolation_inputs, turn_segments
from vlmkit.models.vlm import VisionLanguageModel, register_auto_classes

#: Where a LoRA folder of vlmkit's own VLM keeps its base model (relative to the folder).
LORA_BASE_DIR = "base"


def lora_free_state_dict(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights out of a peft model's state dict: LoRA factors and trained copies
    (`modules_to_save`) dropped, wrapped layers' original weights under their plain names."""
    base: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        name = key.removeprefix("base_model.model.")
        if "lora_" in name or ".modules_to_save." in name:
            continue
        base[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return base


def quantize_language_model(model: VisionLanguageModel, spec: Any, device: str | None = None) -> int:
    """QLoRA for vlmkit's own VLM: the LM's linear layers (not its head) become bitsandbytes 4-bit
    layers, quantised on `device` (CUDA when there is one), and the whole model moves there.

    The vision tower and projector stay in their dtype (the projector is usually trained; a tower's
    widths are often no multiple of bitsandbytes' block). Returns the number of layers quantised.
    `is_loaded_in_4bit` tells peft to put its 4-bit LoRA layers on them and k-bit preparation to
    turn on gradient checkpointing, as for a transformers checkpoint loaded in 4-bit.
    """
    if spec.bits != 4:
        raise ConfigError(
            "model.quantization.bits: 8 is not supported for a VLM composed by vlmkit (QLoRA is 4-bit); "
            "use bits: 4 or drop model.quantization"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("model.quantization needs bitsandbytes: pip install 'vlmkit[train]'") from None
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute = getattr(torch, spec.compute_dtype)
    lm = model.language_model
    head = lm.get_output_embeddings()
    layers = [(name, m) for name, m in lm.named_modules() if type(m) is nn.Linear and m is not head]
    for name, linear in layers:
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            quant_storage=torch.uint8,
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        owner, _, attr = name.rpartition(".")
        setattr(lm.get_submodule(owner), attr, quantized.to(target))
    model.to(target)
    model.is_loaded_in_4bit = True
    return len(layers)


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def dequantized_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each 4-bit layer's packed weight and quantisation state replaced by its
    dequantised weight: the base a QLoRA run trained against, in full precision, so a folder holds
    weights `from_pretrained` reads and a LoRA merge into it is not rounded to 4 bits."""
    import bitsandbytes as bnb

    dtype = model.get_input_embeddings().weight.dtype
    out = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = f"{name}.weight"
            for extra in [k for k in out if k.startswith(key + ".")]:
                del out[extra]
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            out[key] = weight.to(dtype)
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.data.to(dtype)
    return out


class VLMAdapter(ModelAdapter):
    """Prompts put one image placeholder at the start of the first user turn; `encode` expands it
    to the projector's N tokens. Labels cover each assistant turn and its end-of-turn token."""

    model_types = ("vlmkit_vlm",)
    generate_returns_prompt = False
    #: add `image_keys` to training batches (set by model.speed.vision_feature_cache).
    emit_image_keys = False

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BaseImageProcessor,
        max_length: int | None = None,
        image_cache_size: int = 0,
        token_cache: bool = False,
    ) -> None:
        """`token_cache` keeps each sample's token ids and labels after its first encoding: a
        multi-epoch run over short samples otherwise spends a good part of each step rendering chat
        templates. Keyed by the conversation's text, so a changed sample is encoded afresh."""
        self.model = model
        keep_softcapping(model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self._pixels: ImageCache[torch.Tensor] = ImageCache(image_cache_size)
        self._tokens: dict[tuple[Any, ...], tuple[list[int], list[int] | None]] | None = (
            {} if token_cache else None
        )
        self._stops = end_of_turn_ids(tokenizer)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        quantization: Any = None,
        **kwargs: Any,
    ) -> VLMAdapter:
        """`quantization` (a QuantizationSpec) puts the LM's linear layers in 4-bit (QLoRA)."""
        register_auto_classes()
        try:
            model = VisionLanguageModel.from_pretrained(path, dtype=dtype or torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = AutoImageProcessor.from_pretrained(path)
        except OSError as exc:
            raise ModelLoadError(f"{path} is not a complete vlmkit model folder ({exc})") from None
        if quantization is not None:
            quantize_language_model(model, quantization, device)
        elif device:
            model.to(device)
        return cls(model, tokenizer, image_processor, **kwargs)

    def save(self, out_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """A model folder; for a LoRA-wrapped model the adapter weights, and its frozen base in
        `base/` with a pointer to it: a composed VLM's base exists nowhere else on disk."""
        out = Path(out_dir)
        quantized = is_quantized(self.model)
        if quantized and not is_peft_model(self.model):
            state_dict = dequantized_state_dict(self.model, state_dict or self.model.state_dict())
        self.model.save_pretrained(out, state_dict=state_dict)
        if is_peft_model(self.model):
            full = state_dict if state_dict is not None else self.model.state_dict()
            if quantized:
                full = dequantized_state_dict(self.model, full)
            base = self.model.get_base_model()
            base.save_pretrained(out / LORA_BASE_DIR, state_dict=lora_free_state_dict(full))
            self._save_processing(out / LORA_BASE_DIR)
            pointer = {"base_model": LORA_BASE_DIR, "model_type": base.config.model_type}
            (out / BASE_POINTER_FILE).write_text(json.dumps(pointer, indent=2))
        self._save_processing(out)

    def _save_processing(self, out: Path) -> None:
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)

    def stop_token_ids(self) -> list[int]:
        return self._stops

    def images_per_sample(self) -> tuple[int, int | None]:
        return 0, 1  # one projected image before the first user turn, or a text-only conversation

    # -- encoding -----------------------------------------------------------------------------
    def pixel_values(self, sample: Sample) -> torch.Tensor:
        def make() -> torch.Tensor:
            try:
                image = load_image(sample.image)
            except Exception as exc:
                raise SampleError(sample.id, str(exc)) from None
            return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

        return self._pixels.get_or_make(sample.image, make)

    def _messages(self, sample: Sample, train: bool) -> list[Message]:
        messages = [dict(m) for m in (sample.messages if train else sample.prompt_messages())]
        if sample.image is None:
            return messages  # type: ignore[return-value]
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        text = messages[first_user]["content"]
        after = self.model.config.image_placement == "after_text"
        messages[first_user]["content"] = f"{text}\n{IMAGE_TOKEN}" if after else f"{IMAGE_TOKEN}\n{text}"
        return messages  # type: ignore[return-value]

    def _expand_image(
        self, ids: list[int], labels: list[int] | None, sample_id: str, expect_image: bool = True
    ) -> tuple[list[int], list[int] | None]:
        image_id = self.model.config.image_token_id
        positions = [i for i, token in enumerate(ids) if token == image_id]
        if not positions and expect_image is False:
            return ids, labels
        if len(positions) != 1:
            raise SampleError(sample_id, f"expected one {IMAGE_TOKEN} placeholder, found {len(positions)}")
        at, n = positions[0], self.model.config.num_image_tokens
        ids = ids[:at] + [image_id] * n + ids[at + 1 :]
        if labels is not None:
            labels = labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :]
        return ids, labels

    def tokens(self, sample: Sample, train: bool) -> tuple[list[int], list[int] | None]:
        """Token ids and labels with the image placeholder expanded (from the cache when on)."""
        if self._tokens is None:
            return self._encode_tokens(sample, train)
        key = (train, sample.image is None, *(m["role"] + "\0" + m["content"] for m in sample.messages))
        if key not in self._tokens:
            self._tokens[key] = self._encode_tokens(sample, train)
        ids, labels = self._tokens[key]
        return list(ids), None if labels is None else list(labels)  # callers may not alter the cache

    def _encode_tokens(self, sample: Sample, train: bool) -> tuple[list[int], list[int] | None]:
        try:
            encoded = encode_chat(self.tokenizer, self._messages(sample, train), train=train)
        except ValueError as exc:
            raise SampleError(sample.id, str(exc)) from None
        return self._expand_image(encoded.input_ids, encoded.labels, sample.id, sample.image is not None)

    def encode_one(
        self, sample: Sample, train: bool, pixels_seen: dict[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """One row; `pixels_seen` (image key -> pixels) lets a batch's rows that show one image
        (GRPO's groups, questions about one picture) process it once, cache or not."""
        if train and not any(m["role"] == "assistant" for m in sample.messages):
            raise SampleError(sample.id, "has no assistant turn to learn from")
        ids, labels = self.tokens(sample, train)
        self.check_length(sample, len(ids))
        if sample.image is None:
            return {"input_ids": ids, "labels": labels, "pixel_values": None, "image_key": None}
        key = image_key(sample.image) or f"object:{id(sample.image)}"  # ids are unique while the batch lives
        seen = {} if pixels_seen is None else pixels_seen
        if key not in seen:
            seen[key] = self.pixel_values(sample)
        row = {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": seen[key],
            "image_key": key,
            "stable_key": image_key(sample.image),
        }
        if train and labels is not None and sample.meta.get(INDEPENDENT_TURNS):
            # Questions merged by data.*.turns_per_image: each turn sees the image, not the others.
            if self.model.config.image_placement == "after_text":
                raise SampleError(sample.id, "merged turns need the image before the text (image_placement)")
            prefix = ids.index(self.model.config.image_token_id) + self.model.config.num_image_tokens
            try:
                row["segments"], row["prefix_len"] = turn_segments(labels, prefix), prefix
            except ValueError as exc:
                raise SampleError(sample.id, str(exc)) from None
        return row

    def encode(self, samples: Sequence[Sample], *, train: bool = True) -> Batch:
        pixels_seen: dict[str, torch.Tensor] = {}
        rows = [self.encode_one(sample, train, pixels_seen) for sample in samples]
        batch = collate_rows(rows, self.tokenizer.pad_token_id, left_pad=not train)
        if train and self.emit_image_keys and "pixel_values" in batch:
            # One key per pixel_values row (collate_rows keeps first-seen order), for the feature cache.
            # Decoded images without a path or lazy key get None: they are never cached (an object id
            # can be reused by another image later).
            keys = {row["image_key"]: row["stable_key"] for row in rows if row["pixel_values"] is not None}
            batch["image_keys"] = list(keys.values())  # type: ignore[assignment]
        return batch


def collate_rows(rows: list[dict[str, Any]], pad_id: int, left_pad: bool) -> Batch:
    """Pad token rows to one length (left for generation, right for training) and stack pixels.

    Rows showing the same image share one `pixel_values` row, named by `image_index`.
    """
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        cols = slice(width - n, width) if left_pad else slice(0, n)
        input_ids[i, cols] = torch.tensor(row["input_ids"])
        attention_mask[i, cols] = 1
        if row["labels"] is not None:
            labels[i, cols] = torch.tensor(row["labels"])
    batch: Batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    image_rows = [row for row in rows if row["pixel_values"] is not None]
    unique: dict[str, int] = {}
    image_index = [unique.setdefault(row["image_key"], len(unique)) for row in image_rows]
    first_rows = {index: row for row, index in zip(reversed(image_rows), reversed(image_index), strict=True)}
    if image_rows:
        batch["pixel_values"] = torch.stack([first_rows[i]["pixel_values"] for i in range(len(unique))])
    if len(unique) < len(rows) and image_rows:
        batch["image_index"] = torch.tensor(image_index, dtype=torch.long)
    if rows[0]["labels"] is not None:
        batch["labels"] = labels
    if any("segments" in row for row in rows) and not left_pad:
        batch["attention_mask"], batch["position_ids"] = isolation_inputs(
            [row.get("segments") for row in rows],
            [row.get("prefix_len", 0) for row in rows],
            [len(row["input_ids"]) for row in rows],
            width,
        )
    return batch
