"""The generic adapter for transformers image-text-to-text families, built on the family's processor.

A Sample becomes content-part messages (image parts where the sample puts its images), the
processor's chat template renders them, and the processor itself expands each image part into
the family's image tokens (Pixtral's [IMG_BREAK]/[IMG_END] rows, Idefics3's tiles, Qwen's
dynamic resolution) and pads the batch, so vlmkit trains on exactly what transformers and vLLM
feed the model. Labels come from one rule (`chat_encoding.label_tokens`): the tokens that start
inside an assistant turn of the rendered template, carried onto the processor's ids by aligning
the template's plain tokenization with them; image positions can never be labelled because they
exist only in the processor's ids.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

from vlmkit.data.image_cache import ImageCache
from vlmkit.data.images import image_size, load_image
from vlmkit.data.sample import Message, Sample, image_slots
from vlmkit.errors import ConfigError, ModelLoadError, SampleError
from vlmkit.models.adapters.base import Batch, ModelAdapter
from vlmkit.models.adapters.families import Family, family_of
from vlmkit.models.adapters.hf_base import BASE_POINTER_FILE, is_peft_model, model_float_dtype
from vlmkit.models.attention import keep_softcapping
from vlmkit.models.chat_encoding import IGNORE_INDEX, assistant_spans, end_of_turn_text, label_tokens

logger = logging.getLogger(__name__)


def chat_messages(sample: Sample, prompt: bool) -> list[dict[str, Any]]:
    """Content-part messages: plain-text turns get their images at the start of the first user
    turn (one part per image, as the families' own examples do); content-part turns keep theirs."""
    messages: list[Message] = sample.prompt_messages() if prompt else sample.messages
    count = len(sample.images)
    explicit = sum(image_slots(m) for m in sample.messages)
    if explicit and explicit != count:
        raise SampleError(sample.id, f"has {explicit} image part(s) in its turns but {count} image(s)")
    out: list[dict[str, Any]] = []
    placed = explicit > 0
    for message in messages:
        content = message["content"]
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            if message["role"] == "user" and not placed:
                parts += [{"type": "image"} for _ in range(count)]
                placed = True
            parts.append({"type": "text", "text": content})
        else:
            parts = [dict(part) for part in content]
        out.append({"role": message["role"], "content": parts})
    return out


class TemplateRenderer:
    """Renders the processor's chat template as text through its tokenizer: the same jinja, without
    the processor's own `apply_chat_template` (SmolVLM's reads its video processor even for text)."""

    def __init__(self, processor: Any) -> None:
        self.tokenizer = processor.tokenizer
        self.template = processor.chat_template

    def apply_chat_template(self, messages: list[Any], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kwargs)


class HFGenericAdapter(ModelAdapter):
    """Any transformers image-text-to-text family with a `Family` record (families.py)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        family: Family,
        *,
        max_length: int | None = None,
        image_cache_size: int = 0,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(family.options))
        if unknown:
            known = ", ".join(sorted(family.options)) or "none"
            raise ConfigError(
                f"model.adapter_options {', '.join(unknown)} not understood by the {family.name} family "
                f"(it takes: {known})"
            )
        self.model = model
        keep_softcapping(model)
        self.family = family
        self.processor = processor
        self.tokenizer: PreTrainedTokenizerBase = processor.tokenizer
        self.image_processor = getattr(processor, "image_processor", None)
        self.max_length = max_length
        self.settings = {**family.options, **options}
        self._images: ImageCache[Any] = ImageCache(image_cache_size)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(processor, "chat_template", None) is None and self.tokenizer.chat_template:
            processor.chat_template = self.tokenizer.chat_template
        self.renderer = TemplateRenderer(processor)
        self.configure()
        self.end_of_turn_text = self.probe_end_of_turn()
        stops = {self.tokenizer.convert_tokens_to_ids(t) for t in self.end_of_turn_text}
        self.end_of_turn = {t for t in stops if t is not None}

    def probe_end_of_turn(self) -> list[str]:
        """The template's end-of-turn tokens (PaliGemma has no chat template: none)."""
        if getattr(self.processor, "chat_template", None) is None:
            return []
        return end_of_turn_text(self.renderer, self.tokenizer)

    def configure(self) -> None:
        """Apply adapter options: Qwen-style `min_pixels` / `max_pixels` bound each image's area."""
        low, high = self.settings.get("min_pixels"), self.settings.get("max_pixels")
        if low is None and high is None:
            return
        size = dict(self.image_processor.size)
        size["shortest_edge"] = int(low) if low is not None else size["shortest_edge"]
        size["longest_edge"] = int(high) if high is not None else size["longest_edge"]
        if size["shortest_edge"] > size["longest_edge"]:
            raise ConfigError(f"min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}")
        self.image_processor.size = type(self.image_processor.size)(**size)

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
    ) -> HFGenericAdapter:
        """Load from a folder or hub id; `quantization` (a QuantizationSpec) loads 4/8-bit weights."""
        if Path(path).exists():  # absolute, so a LoRA folder's pointer to this base stays valid
            path = str(Path(path).resolve())
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not a model folder or reachable hub id ({exc})") from None
        family = family_of(config.model_type)
        model_class = getattr(transformers, family.model_class or "")
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
        processor = load_processor(processor_path or path, family)
        return cls(
            model, processor, family, max_length=max_length, image_cache_size=image_cache_size, **options
        )

    def save(self, out_dir: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Full model folder, or for a LoRA-wrapped model the adapter weights + a base pointer;
        either way with the processor (processor_config.json), tokenizer and chat template."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, state_dict=state_dict)
        if is_peft_model(self.model):
            base = self.model.peft_config["default"].base_model_name_or_path
            pointer = {"base_model": base, "model_type": self.model.get_base_model().config.model_type}
            (out / BASE_POINTER_FILE).write_text(json.dumps(pointer, indent=2))
        save_processor(out, self.processor, self.family)

    # -- images --------------------------------------------------------------------------------
    def load_images(self, sample: Sample) -> list[Any]:
        """The sample's decoded images (kept by path in an LRU when image_cache_size > 0)."""
        images = []
        for item in sample.images:
            try:
                images.append(self._images.get_or_make(item, partial(load_image, item)))
            except Exception as exc:
                raise SampleError(sample.id, str(exc)) from None
        if len(images) > 1 and not self.family.multi_image:
            raise SampleError(sample.id, f"has {len(images)} images; the {self.family.name} family takes one")
        return images

    def image_tokens_of(self, sample: Sample) -> int:
        """The processor's own count for the sample's image sizes (the one vLLM uses), if it has one."""
        sizes = [image_size(item) for item in sample.images]
        if any(size is None for size in sizes):
            return 0
        return self.image_tokens_for([size for size in sizes if size is not None])

    def image_tokens_for(self, sizes: Sequence[tuple[int, int]]) -> int:
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if counter is None or not sizes:
            return 0
        try:
            data = counter(image_sizes=[(height, width) for width, height in sizes])
        except Exception:  # an estimate (length grouping, serving's admission), not the encoding
            return 0
        return int(sum(getattr(data, "num_image_tokens", None) or [0]))

    def images_per_sample(self) -> tuple[int, int | None]:
        """Text-only rows are fine (LLaVA's mix has them); several images where the family takes them."""
        return 0, (None if self.family.multi_image else 1)

    # -- encoding --------------------------------------------------------------------------------
    def render(self, sample: Sample, train: bool) -> tuple[str, list[tuple[int, int]]]:
        """The template's text of a sample and its assistant spans (none when generating)."""
        messages = chat_messages(sample, prompt=not train)
        try:
            if not train:
                text = self.renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return text, []
            text, spans = assistant_spans(self.renderer, messages)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"the chat template of {self.tokenizer.name_or_path} cannot render image content parts "
                f"({exc}); set a template that does in chat_template.jinja"
            ) from None
        return self.close_turns(text, spans)

    def close_turns(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """A template that ends assistant turns without an end-of-turn token (LLaVA-1.5 ends them
        with a space) gets EOS after each turn, labelled, so the model learns to stop: LLaVA's own
        training format (`ASSISTANT: answer</s>`)."""
        if self.end_of_turn_text or self.tokenizer.eos_token is None:
            return text, spans
        eos = self.tokenizer.eos_token
        closed: list[tuple[int, int]] = []
        for start, end in reversed(spans):
            text = text[:end] + eos + text[end:]
            closed = [(s + len(eos), e + len(eos)) for s, e in closed]
            closed.insert(0, (start, end + len(eos)))
        return text, closed

    def add_special_tokens(self, text: str) -> bool:
        """Let the tokenizer add BOS unless the template already wrote it."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def processor_inputs(self, samples: Sequence[Sample], texts: list[str], train: bool) -> dict[str, Any]:
        """Keyword arguments of the processor call for a batch (texts, images, padding)."""
        images = [self.load_images(sample) for sample in samples]
        kwargs: dict[str, Any] = {
            "text": texts,
            "padding": True,
            "padding_side": "right" if train else "left",
            "return_tensors": "pt",
            "add_special_tokens": self.add_special_tokens(texts[0]),
        }
        if any(images):
            kwargs["images"] = images  # one list per row, empty for a text-only row
        return kwargs

    def encode(self, samples: Sequence[Sample], *, train: bool = True) -> Batch:
        texts, all_spans = [], []
        for sample in samples:
            if train and not any(m["role"] == "assistant" for m in sample.messages):
                raise SampleError(sample.id, "has no assistant turn to learn from")
            text, spans = self.render(sample, train)
            texts.append(text)
            all_spans.append(spans)
        kwargs = self.processor_inputs(samples, texts, train)
        try:
            processed = self.processor(**kwargs)
        except (ValueError, TypeError, IndexError) as exc:
            ids = ", ".join(sample.id for sample in samples)
            raise SampleError(ids, f"the {self.family.name} processor refused it ({exc})") from None
        batch: Batch = {k: v for k, v in processed.items() if isinstance(v, torch.Tensor)}
        batch.pop("labels", None)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for sample, length in zip(samples, lengths, strict=True):
            self.check_length(sample, length)
        if train:
            batch["labels"] = self.labels(samples, texts, all_spans, batch, kwargs["add_special_tokens"])
        dtype = model_float_dtype(self.model)
        for name, value in batch.items():
            if name.startswith("pixel_values") and value.is_floating_point() and dtype is not None:
                batch[name] = value.to(dtype)
        return batch

    def labels(
        self,
        samples: Sequence[Sample],
        texts: list[str],
        all_spans: list[list[tuple[int, int]]],
        batch: Batch,
        add_special_tokens: bool,
    ) -> torch.Tensor:
        """Each row's assistant-span labels, carried from the template's plain tokenization onto the
        processor's (image-expanded, padded) ids; the tokens only the processor has get none."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (sample, text, spans) in enumerate(zip(samples, texts, all_spans, strict=True)):
            encoded = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            plain = list(encoded["input_ids"])
            try:
                plain_labels = label_tokens(plain, encoded["offset_mapping"], spans)
            except ValueError as exc:
                raise SampleError(sample.id, str(exc)) from None
            columns = mask[row].nonzero().flatten().tolist()
            full = ids[row, columns].tolist()
            row_labels = [IGNORE_INDEX] * len(full)
            matcher = difflib.SequenceMatcher(None, plain, full, autojunk=False)
            for a, b, size in matcher.get_matching_blocks():
                row_labels[b : b + size] = plain_labels[a : a + size]
            wanted = sum(label != IGNORE_INDEX for label in plain_labels)
            if sum(label != IGNORE_INDEX for label in row_labels) != wanted:
                raise ConfigError(
                    f"the {self.family.name} processor changed the tokens of an answer in sample {sample.id!r}, "
                    "so its labels cannot be placed; check the processor's chat template and image token"
                )
            expanded = set(full) - set(plain)
            assert_label_invariants(full, row_labels, expanded | self.image_token_ids(), sample.id)
            labels[row, columns] = torch.tensor(row_labels)
        return labels

    def image_token_ids(self) -> set[int]:
        """Ids of image / vision-marker tokens (never labelled): the processor's and the config's."""
        found = set()
        for owner in (self.processor, self.model.config):
            for name in (
                "image_token_id",
                "image_token_index",
                "vision_start_token_id",
                "vision_end_token_id",
            ):
                value = getattr(owner, name, None)
                if isinstance(value, int):
                    found.add(value)
        return found

    def stop_token_ids(self) -> list[int]:
        stops = set(super().stop_token_ids()) | self.end_of_turn
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        return sorted(stops)


def assert_label_invariants(ids: list[int], labels: list[int], forbidden: set[int], sample_id: str) -> None:
    """Labels equal their input ids where set, and never fall on image / vision-marker tokens."""
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            continue
        if label != token or token in forbidden:
            raise AssertionError(f"sample {sample_id!r}: label mask broken at token {token} (label {label})")
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError(sample_id, "no answer token survived encoding")


# -- processors ------------------------------------------------------------------------------------
def _accepts_missing(cls: type) -> type:
    """`cls` built without its video processor (it needs torchvision); named as `cls` when saved."""

    class WithoutVideo(cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    WithoutVideo.__name__ = WithoutVideo.__qualname__ = cls.__name__
    return WithoutVideo


def load_processor(path: str | Path, family: Family) -> Any:
    """The family's processor: `AutoProcessor`, or, where that cannot load (no processor_config,
    or one that wants a video processor where torchvision cannot be imported), the processor class
    the folder names (the family's otherwise) built from the folder's tokenizer and image processor.

    The folder's own class is kept because it lays out the image tokens: a LLaVA folder with a
    Pixtral tower names PixtralProcessor, whose [IMG_BREAK]/[IMG_END] rows LlavaProcessor lacks.
    """
    try:
        processor = AutoProcessor.from_pretrained(path)
        if hasattr(processor, "tokenizer") and hasattr(processor, "image_processor"):
            return processor
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as exc:
        logger.debug("AutoProcessor could not load %s (%s); building %s", path, exc, family.processor_class)
    settings: dict[str, Any] = {}
    config_file = Path(path) / "processor_config.json"
    if config_file.is_file():
        settings = json.loads(config_file.read_text())
    name = settings.get("processor_class") or family.processor_class or ""

    def cannot_build(exc: ImportError) -> ModelLoadError:
        reason = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".")
        return ModelLoadError(
            f"{path}: its processor ({name}) cannot be built here ({reason}); "
            "install what it names (torchvision must match the installed torch build)"
        )

    try:
        cls = getattr(transformers, name, None)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except ImportError as exc:
        raise cannot_build(exc) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} has no tokenizer or image processor ({str(exc).splitlines()[0]}); save the family's "
            "processor there (processor.save_pretrained)"
        ) from None
    if cls is None:
        raise ModelLoadError(f"{path}: its processor class {name!r} is not one transformers has")
    template = getattr(tokenizer, "chat_template", None)
    try:  # a class whose backend is missing is a placeholder that raises ImportError when touched
        accepted = set(inspect.signature(cls.__init__).parameters)
        kwargs = {key: value for key, value in settings.items() if key in accepted}
        attributes = {attribute: None for attribute in cls.get_attributes()}
        attributes.update(tokenizer=tokenizer, image_processor=image_processor)
        return _accepts_missing(cls)(**attributes, chat_template=template, **kwargs)
    except ImportError as exc:
        raise cannot_build(exc) from None


def save_processor(out: Path, processor: Any, family: Family) -> None:
    """Tokenizer, image processor, chat template and processor_config.json: what AutoProcessor,
    vLLM and `load_processor` read back. A processor built without its video processor is written
    part by part (transformers' own save needs every part)."""
    try:
        processor.save_pretrained(out)
    except AttributeError:
        processor.tokenizer.save_pretrained(out)
        processor.image_processor.save_pretrained(out)
        settings = {"processor_class": family.processor_class}
        for name in inspect.signature(type(processor).__init__).parameters:
            value = getattr(processor, name, None)
            if name not in ("self", "chat_template", "kwargs") and isinstance(value, (int, float, str, bool)):
                settings[name] = value
        (out / "processor_config.json").write_text(json.dumps(settings, indent=2))
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    if template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(template)
