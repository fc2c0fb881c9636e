"""Compose a VisionLanguageModel from parts named in a run config.

Each part comes from a config dict (random init) or a pretrained path / hub id. A tokenizer is
loaded with the LM, or trained on the run's text when the LM is built from scratch.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

try:  # transformers >= 5 names the PIL-backed processor; torchvision is not a dependency
    from transformers import ViTImageProcessorPil as ViTImageProcessor
except ImportError:  # pragma: no cover
    from transformers import ViTImageProcessor

from vlmkit.errors import ConfigError
from vlmkit.models.adapters.vlm import VLMAdapter, quantize_language_model
from vlmkit.models.specs import VLMSpec
from vlmkit.models.tokenizer import IMAGE_TOKEN, train_tokenizer
from vlmkit.models.vision import load_vision_tower, vision_config_of
from vlmkit.models.vlm import VisionLanguageModel, VLMConfig, register_auto_classes

logger = logging.getLogger(__name__)

# Used when a pretrained base LM (e.g. gemma-2-2b) ships no chat template: question, newline, answer.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ m['content'] }}{{ eos_token }}\n"
    "{%- else -%}{{ m['content'] }}\n{% endif -%}{%- endfor -%}"
)


def build_tokenizer(spec: VLMSpec, texts: Iterable[str] | None) -> PreTrainedTokenizerBase:
    source = spec.tokenizer.pretrained or spec.language_model.pretrained
    if source:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        if texts is None:
            raise ConfigError("a from-scratch language model needs training text to learn its tokenizer")
        tokenizer = train_tokenizer(
            texts,
            kind=spec.tokenizer.kind,
            vocab_size=spec.tokenizer.vocab_size,
            lowercase=spec.tokenizer.lowercase,
        )
    if spec.tokenizer.chat_template:
        tokenizer.chat_template = spec.tokenizer.chat_template
    elif not tokenizer.chat_template:
        logger.info("tokenizer has no chat template; using vlmkit's plain question/answer template")
        tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer


def check_part_fields(spec: VLMSpec) -> None:
    """A key a part's config class does not define becomes a stray attribute. Some are read by the
    model code all the same (Qwen2's `head_dim`), so such keys are logged, not refused; one that is
    a near miss of a real field (`hiden_sizes`) is a typo that would build a default-sized part
    silently, and is refused in one line, before the tokenizer is trained. (The one config check
    that needs transformers' config classes.)"""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for where, part in (("vision", spec.vision), ("language_model", spec.language_model)):
        if part.config is None:
            continue
        config_class = CONFIG_MAPPING[part.config["model_type"]]
        known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
        for key in sorted(set(part.config) - known):
            close = difflib.get_close_matches(key, known, 1, cutoff=0.85)
            if close:
                raise ConfigError(
                    f"model.init.{where}.config.{key}: {config_class.__name__} has no such field; "
                    f"did you mean {close[0]}?"
                )
            logger.warning(
                "model.init.%s.config.%s is not a field of %s: kept as an attribute, used only if "
                "the model code reads it",
                where,
                key,
                config_class.__name__,
            )


def _text_part(spec: VLMSpec, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    part = spec.language_model
    overrides: dict[str, Any] = {}
    if spec.dropout is not None:
        overrides = {"attention_dropout": spec.dropout, "hidden_dropout": spec.dropout}
    if part.pretrained:
        config = AutoConfig.from_pretrained(part.pretrained)
        for key, value in overrides.items():
            if hasattr(config, key):
                setattr(config, key, value)
        model = AutoModelForCausalLM.from_pretrained(part.pretrained, config=config)
    else:
        fields = dict(part.config or {})
        fields.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = AutoConfig.for_model(**fields)
        for key, value in overrides.items():
            if hasattr(config, key):
                setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(config)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def build_vlm(
    spec: VLMSpec,
    texts: Iterable[str] | None = None,
    quantization: Any = None,
    **adapter_kwargs: Any,
) -> VLMAdapter:
    """Build the model, tokenizer and image processor; pretrained parts keep their weights.

    `quantization` (a QuantizationSpec) puts the LM's linear layers in 4-bit once built (QLoRA).
    """
    register_auto_classes()
    check_part_fields(spec)
    tokenizer = build_tokenizer(spec, texts)
    language_model = _text_part(spec, tokenizer)
    image_processor = None
    if spec.vision.pretrained:
        vision_tower = load_vision_tower(spec.vision.pretrained)
        try:
            image_processor = AutoImageProcessor.from_pretrained(spec.vision.pretrained)
        except OSError:
            logger.info(
                "%s has no image processor; resizing to %d px", spec.vision.pretrained, spec.image_size
            )
    else:
        vision_config = vision_config_of(AutoConfig.for_model(**spec.vision.config))
        if hasattr(vision_config, "image_size"):
            vision_config.image_size = spec.image_size
        vision_tower = None
    if image_processor is None:
        image_processor = ViTImageProcessor(
            size={"height": spec.image_size, "width": spec.image_size},
            image_mean=spec.image_mean,
            image_std=spec.image_std,
        )
    probe = image_processor(images=Image.new("RGB", (32, 32)), return_tensors="pt")["pixel_values"]
    config = VLMConfig(
        vision_config=(vision_tower.config if vision_tower is not None else vision_config).to_dict(),
        text_config=language_model.config.to_dict(),
        projector=spec.projector,
        projector_hidden_size=spec.projector_hidden_size,
        projector_dropout=spec.projector_dropout,
        projector_kwargs=spec.projector_kwargs or None,
        vision_feature_layer=spec.feature_layer,
        vision_feature_select=spec.feature_select,
        image_size=int(probe.shape[-1]),
        image_placement=spec.image_placement,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = VisionLanguageModel(config, vision_tower=vision_tower, language_model=language_model)
    model.eval()
    with torch.no_grad():
        model.config.num_image_tokens = int(model.get_image_features(probe).shape[1])
    model.train()
    if quantization is not None:
        count = quantize_language_model(model, quantization)
        logger.info("quantised %d language-model linear layers to 4-bit %s", count, quantization.quant_type)
    return VLMAdapter(model, tokenizer, image_processor, **adapter_kwargs)
