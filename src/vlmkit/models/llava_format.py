"""A composed vlmkit VLM written as a LLaVA folder, which plain transformers (and vLLM) load.

`LlavaForConditionalGeneration` runs a vision tower (`AutoModel` of its vision config), takes
hidden layer `vision_feature_layer`, drops the CLS token or not (`vision_feature_select_strategy`
"default" / "full"), and applies `linear_1 -> act -> linear_2`. vlmkit's VLM with a ViT-like tower
(CLIP, SigLIP, DINOv2, ViT) and an `mlp` projector whose hidden width is the LM's is exactly that;
a `linear` projector is too, as `linear_1` with an identity activation and an identity `linear_2`.
The last hidden state of DINOv2 / ViT / SigLIP passes the tower's final layer norm, which LLaVA's
`hidden_states[-1]` does not; the vision config's `tie_last_hidden_states: true` makes
transformers hand LLaVA that normed state. DINOv2's encoder cannot tie it, so a DINOv2 tower
whose last layer feeds the projector is written as the equivalent ViT (`dinov2_as_vit`).
Everything else (feature-map towers such as ResNet, the resampler, CLS-only features) has no
LLaVA form: `llava_incompatibility` says why.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.initialization import no_init_weights

from vlmkit.errors import ConfigError
from vlmkit.models.dinov2_as_vit import dinov2_vit_problem, vit_config, vit_state_dict
from vlmkit.models.tokenizer import IMAGE_TOKEN
from vlmkit.models.vision import BACKBONES
from vlmkit.models.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)

#: Vision towers LLaVA's `AutoModel` vision tower runs as vlmkit does (sequence models).
LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model", "dinov2", "vit")
#: Towers vLLM's LLaVA implementation builds (it has no DINOv2 / ViT tower).
VLLM_TOWERS = ("clip_vision_model", "siglip_vision_model")

README = "README.md"


def llava_incompatibility(model: VisionLanguageModel) -> str | None:
    """Why this VLM has no exact LLaVA form (one clause), or None when it has one."""
    config = model.config
    vision_type = config.vision_config.model_type
    if vision_type not in LLAVA_TOWERS:
        return (
            f"its {vision_type} vision tower gives feature maps, which LLaVA's vision tower "
            f"(a ViT: {', '.join(LLAVA_TOWERS)}) cannot take"
        )
    if _as_vit(model) and (problem := dinov2_vit_problem(model.vision_tower)) is not None:
        return f"its DINOv2 tower's last layer maps to LLaVA only as a ViT, and {problem}"
    if config.projector not in ("mlp", "linear"):
        return f"its {config.projector} projector has no transformers equivalent (LLaVA's is a 2-layer MLP)"
    text_hidden = int(config.text_config.hidden_size)
    if config.projector == "mlp" and config.projector_hidden_size not in (None, text_hidden):
        return (
            f"its MLP projector is {config.projector_hidden_size} wide inside, where LLaVA's is the LM's "
            f"hidden size ({text_hidden})"
        )
    if config.vision_feature_select == "cls":
        return "it feeds the LM the CLS token alone, where LLaVA feeds patch tokens"
    lm = model.language_model
    head = lm.get_output_embeddings()
    if getattr(lm, "base_model_prefix", None) != "model" or head is None or head.bias is not None:
        return f"its language model ({type(lm).__name__}) is not a base model plus a bias-free lm_head"
    if config.image_placement not in ("before_text", "after_text"):  # pragma: no cover - schema guards it
        return f"image_placement {config.image_placement!r} is unknown"
    return None


def _has_cls(model: VisionLanguageModel) -> bool:
    return BACKBONES[model.config.vision_config.model_type].has_cls


def _as_vit(model: VisionLanguageModel) -> bool:
    """DINOv2 at its last layer is written as a ViT (`models/dinov2_as_vit.py` says why)."""
    config = model.config
    return config.vision_config.model_type == "dinov2" and config.vision_feature_layer == -1


def llava_config(model: VisionLanguageModel, tokenizer: Any) -> LlavaConfig:
    """The LlavaConfig of a compatible VLM (same towers, same feature layer and selection)."""
    config = model.config
    vision = config.vision_config.to_dict()
    if _as_vit(model):
        vision = vit_config(model.vision_tower, int(config.image_size))
    elif config.vision_feature_layer == -1:
        # vlmkit takes the tower's last_hidden_state (after the final layer norm, for DINOv2 / ViT /
        # SigLIP); this makes transformers return it as hidden_states[-1] (CLIP: the same tensor).
        vision["tie_last_hidden_states"] = True
    full = config.vision_feature_select == "cls_patch" or not _has_cls(model)
    text = config.text_config.to_dict()
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(config.image_token_id),
        image_seq_length=int(config.num_image_tokens),
        projector_hidden_act="gelu" if config.projector == "mlp" else "linear",
        vision_feature_select_strategy="full" if full else "default",
        vision_feature_layer=int(config.vision_feature_layer),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
    )


def llava_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """vlmkit's weights under LLaVA's names; a linear projector gets an identity `linear_2`."""
    state: dict[str, torch.Tensor] = {}
    head_name = next(
        name
        for name, module in model.language_model.named_modules()
        if module is model.get_output_embeddings()
    )
    as_vit = _as_vit(model)
    if as_vit:
        vit = vit_state_dict(model.vision_tower, int(model.config.image_size))
        state.update({"model.vision_tower." + key: value for key, value in vit.items()})
    for key, value in model.state_dict().items():
        if key.startswith("vision_tower."):
            if not as_vit:
                state["model." + key] = value
        elif key.startswith("language_model.model."):
            state["model.language_model." + key.removeprefix("language_model.model.")] = value
        elif key.startswith(f"language_model.{head_name}."):
            state["lm_head." + key.removeprefix(f"language_model.{head_name}.")] = value
        elif not key.startswith("projector."):
            raise ConfigError(f"weight {key} has no place in a LLaVA folder; export with --format vlmkit")
    projector = model.projector
    if model.config.projector == "mlp":
        first, second = projector.net[1], projector.net[3]
        pairs = {"linear_1": first, "linear_2": second}
    else:
        width = projector.proj.out_features
        identity = torch.nn.Linear(width, width, dtype=projector.proj.weight.dtype)
        with torch.no_grad():
            identity.weight.copy_(torch.eye(width))
            identity.bias.zero_()
        pairs = {"linear_1": projector.proj, "linear_2": identity}
    for name, layer in pairs.items():
        state[f"model.multi_modal_projector.{name}.weight"] = layer.weight.detach()
        state[f"model.multi_modal_projector.{name}.bias"] = layer.bias.detach()
    return state


def llava_chat_template(template: str, placement: str) -> str:
    """The tokenizer's template, preceded by a step that turns content parts into vlmkit's text.

    transformers' processors render `{"type": "image"}` / `{"type": "text"}` parts; vlmkit's
    templates render text with one `<image>` placeholder before (or after) the turn's text, which
    the LLaVA processor then expands to the image's tokens. Plain-text turns pass unchanged.
    """
    joined = (
        "'" + IMAGE_TOKEN + "\\n' + part.text"
        if placement == "before_text"
        else "part.text + '\\n" + IMAGE_TOKEN + "'"
    )
    preamble = (
        "{%- set vlmkit = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set vlmkit.messages = vlmkit.messages + [message] -%}"
        "{%- else -%}"
        "{%- set part = namespace(text='', image=false) -%}"
        "{%- for content in message['content'] -%}"
        "{%- if content['type'] in ['image', 'image_url'] -%}{%- set part.image = true -%}"
        "{%- elif content['type'] == 'text' -%}{%- set part.text = part.text + content['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if part.image -%}{%- set part.text = " + joined + " -%}{%- endif -%}"
        "{%- set vlmkit.messages = vlmkit.messages + [{'role': message['role'], 'content': part.text}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = vlmkit.messages -%}"
    )
    return preamble + template


def llava_processor(model: VisionLanguageModel, tokenizer: Any, image_processor: Any) -> LlavaProcessor:
    """A LlavaProcessor that lays out as many `<image>` tokens as vlmkit does."""
    config = model.config
    extra = 1 if _has_cls(model) else 0
    patch = int(config.vision_config.patch_size)
    full = config.vision_feature_select == "cls_patch" or not _has_cls(model)
    template = llava_chat_template(tokenizer.chat_template, config.image_placement)
    tokenizer = copy.deepcopy(tokenizer)  # the caller's keeps its own template
    tokenizer.chat_template = template
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="full" if full else "default",
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=extra,
    )
    side = int(config.image_size)
    count = (side // patch) ** 2 + extra - (0 if full else 1)
    if count != config.num_image_tokens:
        raise ConfigError(
            f"a LLaVA processor would lay out {count} image tokens where this model uses "
            f"{config.num_image_tokens}; export with --format vlmkit"
        )
    return processor


def to_llava(
    model: VisionLanguageModel, tokenizer: Any, image_processor: Any
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The same network as a LlavaForConditionalGeneration (weights shared, not copied) + processor."""
    reason = llava_incompatibility(model)
    if reason is not None:
        raise ConfigError(f"this VLM has no LLaVA form: {reason}; export with --format vlmkit")
    config = llava_config(model, tokenizer)
    with no_init_weights():  # every weight is assigned below; buffers are built as usual
        llava = LlavaForConditionalGeneration(config)
    missing, unexpected = llava.load_state_dict(llava_state_dict(model), strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(
            f"LLaVA weight names do not match (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "export with --format vlmkit"
        )
    llava.tie_weights()
    llava.config.dtype = next(model.parameters()).dtype
    llava.generation_config = GenerationConfig(
        eos_token_id=_stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return llava.eval(), llava_processor(model, tokenizer, image_processor)


def _stop_ids(tokenizer: Any) -> list[int]:
    from vlmkit.models.chat_encoding import end_of_turn_ids

    return end_of_turn_ids(tokenizer)


def save_llava(model: VisionLanguageModel, tokenizer: Any, image_processor: Any, out: Path) -> None:
    """Write the LLaVA folder: weights, config, generation config, processor, chat template, README."""
    llava, processor = to_llava(model, tokenizer, image_processor)
    llava.save_pretrained(out)
    processor.save_pretrained(out)
    tower = model.config.vision_config.model_type
    if _as_vit(model):
        tower = "dinov2 (written as the equivalent vit)"
    (out / README).write_text(llava_readme(tower, model.config.projector))
    logger.info(
        "wrote a LLaVA-format folder (%s tower, %s projector) to %s", tower, model.config.projector, out
    )


def llava_readme(tower: str, projector: str) -> str:
    vllm = (
        "vLLM's LLaVA implementation builds this vision tower, so `vllm serve <folder>` should load it "
        "(not tested by vlmkit's suite)."
        if tower in VLLM_TOWERS and projector == "mlp"
        else f"vLLM's LLaVA implementation has no {tower} tower or no identity projector activation, "
        "so use transformers (or vlmkit) to serve it."
    )
    return f"""# A vlmkit VLM in LLaVA format

Written by `vlmkit export` from a model composed with vlmkit ({tower} vision tower, {projector}
projector). It is a plain `LlavaForConditionalGeneration` folder; vlmkit is not needed to load it:

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(folder)
processor = AutoProcessor.from_pretrained(folder)
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": question}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:]))
```

Greedy decoding gives the tokens vlmkit gives. Notes:
- `vision_config.tie_last_hidden_states: true` (when the feature layer is the last) makes transformers
  hand LLaVA the tower's final, layer-normed output, as vlmkit trained with.
- A Gemma 2 language model's final logit soft-capping is not applied by LLaVA's head; it does not
  change greedy tokens, only sampled ones.
- {vllm}
"""


def vlmkit_readme(reason: str) -> str:
    """README of an export that stays a vlmkit folder: what loads it, and why it is not LLaVA."""
    return f"""# A vlmkit VLM (model_type `vlmkit_vlm`)

This folder is not in a transformers-native format because {reason}. It loads with vlmkit installed:

```python
import vlmkit  # registers the vlmkit_vlm model type with transformers' Auto classes
from vlmkit.models.adapters import load_adapter
adapter = load_adapter(folder)          # model + tokenizer + image processor
print(adapter.generate([sample])[0])    # or: vlmkit chat / vlmkit serve / vlmkit eval
```

A VLM with a ViT tower (CLIP, SigLIP, DINOv2, ViT) and an `mlp` or `linear` projector exports as
a LLaVA folder instead, which plain transformers and vLLM load (docs/finetuning.md).
"""


def write_readme(out: Path, text: str) -> None:
    (Path(out) / README).write_text(text)


__all__ = [
    "LLAVA_TOWERS",
    "llava_chat_template",
    "llava_config",
    "llava_incompatibility",
    "llava_state_dict",
    "save_llava",
    "to_llava",
    "vlmkit_readme",
]
