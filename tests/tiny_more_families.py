"""Tiny random folders of the families the generic adapter added (issue 15), built offline.

Each is what `save_pretrained` of the family's model and processor writes, with a trained tiny
tokenizer carrying the family's special tokens and a chat template in the family's own style.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiny_models import CORPUS, QWEN2_VL_TEMPLATE, QWEN_SPECIALS, tiny_text

# ChatML with each image part rendered as IMAGE (LLaVA-OneVision / InternVL style).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolVLM / Idefics3: "User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n".
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Mistral-style with Pixtral's [IMG] part.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}[/INST]{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)


def llama_tokenizer(specials: list[str], template: str, pad: str = "<pad>") -> Any:
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    base = LlamaTokenizer()
    base._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    tokenizer = base.train_new_from_iterator(CORPUS, vocab_size=300, new_special_tokens=[*specials, pad])
    tokenizer.pad_token = pad
    tokenizer.chat_template = template
    return tokenizer


def chatml_tokenizer(specials: list[str], template: str = CHATML) -> Any:
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        CORPUS, vocab_size=400, new_special_tokens=[*QWEN_SPECIALS, *specials]
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = template
    return tokenizer


def text_ids(tokenizer: Any, model_type: str = "llama", hidden: int = 32) -> dict:
    return {
        **tiny_text(hidden),
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def without_video(cls: type, **kwargs: Any) -> Any:
    """A processor that wants a video processor, built without one (no torchvision here)."""
    from vlmkit.models.adapters.hf_generic import _accepts_missing

    return _accepts_missing(cls)(video_processor=None, **kwargs)


def save(out: Path, model: Any, processor: Any, family: str) -> Path:
    from vlmkit.models.adapters.families import FAMILIES
    from vlmkit.models.adapters.hf_generic import save_processor

    model.save_pretrained(out)
    save_processor(out, processor, FAMILIES[family])
    return out


CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
SIGLIP = {**CLIP, "model_type": "siglip_vision_model"}
del SIGLIP["projection_dim"]
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def build_llava_next(out: Path) -> Path:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from tiny_models import LLAVA_TEMPLATE

    torch.manual_seed(0)
    tokenizer = llama_tokenizer(["<image>"], LLAVA_TEMPLATE)
    config = LlavaNextConfig(
        text_config=text_ids(tokenizer),
        vision_config=CLIP,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return save(out, LlavaNextForConditionalGeneration(config), processor, "llava_next")


def build_llava_onevision(out: Path) -> Path:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    torch.manual_seed(0)
    tokenizer = chatml_tokenizer(["<image>", "<video>"], CHATML.replace("IMAGE", "<image>"))
    config = LlavaOnevisionConfig(
        text_config=text_ids(tokenizer, "qwen2"),
        vision_config=SIGLIP,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    processor = without_video(
        LlavaOnevisionProcessor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )
    return save(out, LlavaOnevisionForConditionalGeneration(config), processor, "llava_onevision")


def build_qwen3_vl(out: Path) -> Path:
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    torch.manual_seed(0)
    tokenizer = chatml_tokenizer([], QWEN2_VL_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        **text_ids(tokenizer, "qwen3_vl_text"),
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [1],
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    )
    processor = without_video(
        Qwen3VLProcessor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_TEMPLATE,
    )
    return save(out, Qwen3VLForConditionalGeneration(config), processor, "qwen3_vl")


def build_idefics3(out: Path, smolvlm: bool = False) -> Path:
    import transformers

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    family = "smolvlm" if smolvlm else "idefics3"
    torch.manual_seed(0)
    specials = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    tokenizer = llama_tokenizer(specials, IDEFICS_TEMPLATE)
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text_ids(tokenizer),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer),
    )
    image_processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    kwargs = {"image_processor": image_processor, "tokenizer": tokenizer, "image_seq_len": 4}
    processor_class = getattr(transformers, f"{prefix}Processor")
    if smolvlm:
        processor = without_video(processor_class, **kwargs, chat_template=IDEFICS_TEMPLATE)
    else:
        processor = processor_class(**kwargs, chat_template=IDEFICS_TEMPLATE)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return save(out, model, processor, family)


PIXTRAL_TOKENS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
PIXTRAL = {
    "model_type": "pixtral",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 16,
    "patch_size": 8,
}


def pixtral_processor(tokenizer: Any, image_size: int, spatial_merge_size: int) -> Any:
    """PixtralProcessor for the tiny Pixtral tower (its module imports torchvision)."""
    from transformers import PixtralImageProcessorPil, PixtralProcessor

    patch = PIXTRAL["patch_size"]
    return PixtralProcessor(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": image_size}, patch_size=patch),
        tokenizer=tokenizer,
        patch_size=patch,
        spatial_merge_size=spatial_merge_size,
        chat_template=MISTRAL_TEMPLATE,
        **PIXTRAL_TOKENS,
    )


def build_mistral3(out: Path) -> Path:
    """Mistral3 with a Pixtral tower: [IMG] x cols, [IMG_BREAK] after each row, [IMG_END] last."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
    )

    torch.manual_seed(0)
    tokenizer = llama_tokenizer([*PIXTRAL_TOKENS.values(), "[INST]", "[/INST]"], MISTRAL_TEMPLATE)
    config = Mistral3Config(
        text_config=text_ids(tokenizer, "mistral"),
        vision_config={**PIXTRAL, "image_size": 64},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    processor = pixtral_processor(tokenizer, image_size=64, spatial_merge_size=2)
    return save(out, Mistral3ForConditionalGeneration(config), processor, "mistral3")


def build_llava_pixtral(out: Path) -> Path:
    """A LLaVA folder with a Pixtral tower (Pixtral-12B's layout): its processor_config names
    PixtralProcessor, which puts [IMG_BREAK] after each row of [IMG] and [IMG_END] last.

    Where torchvision imports, the folder is what PixtralProcessor.save_pretrained writes; where it
    does not (PixtralProcessor's module needs it), the same two processor files are written by hand.
    """
    import importlib.util
    import json

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = llama_tokenizer([*PIXTRAL_TOKENS.values(), "[INST]", "[/INST]"], MISTRAL_TEMPLATE)
    config = LlavaConfig(
        text_config=text_ids(tokenizer, "mistral"),
        vision_config={**PIXTRAL, "image_size": 32},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    model = LlavaForConditionalGeneration(config)
    if importlib.util.find_spec("torchvision") is not None:
        return save(out, model, pixtral_processor(tokenizer, image_size=32, spatial_merge_size=1), "llava")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(MISTRAL_TEMPLATE)
    patch = PIXTRAL["patch_size"]
    image_settings = {
        "image_processor_type": "PixtralImageProcessor",
        "patch_size": patch,
        "size": {"longest_edge": 32},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image_settings))
    settings = {"processor_class": "PixtralProcessor", "patch_size": patch, "spatial_merge_size": 1}
    (out / "processor_config.json").write_text(json.dumps({**settings, **PIXTRAL_TOKENS}))
    return out


BUILDERS = {
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen3_vl": build_qwen3_vl,
    "idefics3": build_idefics3,
    "smolvlm": lambda out: build_idefics3(out, smolvlm=True),
    "mistral3": build_mistral3,
    "llava_pixtral": build_llava_pixtral,
}


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def with_named_tokens(tokenizer: Any, out: Path, named: dict[str, str]) -> Any:
    """The tokenizer reloaded with named extra special tokens (tokenizer.boi_token, ...)."""
    from transformers import AutoTokenizer

    folder = out / "_tokenizer"
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, extra_special_tokens=named)


def build_gemma3(out: Path) -> Path:
    """Gemma 3: SigLIP tower, 16 patches pooled to 4 soft tokens between <start_of_image>/<end_of_image>."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        GemmaTokenizer,
    )

    torch.manual_seed(0)
    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = GemmaTokenizer().train_new_from_iterator(
        CORPUS, vocab_size=300, new_special_tokens=[*named.values(), "<start_of_turn>", "<end_of_turn>"]
    )
    tokenizer = with_named_tokens(tokenizer, out, named)
    tokenizer.chat_template = GEMMA3_TEMPLATE
    text = {**text_ids(tokenizer, "gemma3_text"), "sliding_window": 16}
    config = Gemma3Config(
        text_config=text,
        vision_config={**SIGLIP},
        mm_tokens_per_image=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=GEMMA3_TEMPLATE,
    )
    return save(out, Gemma3ForConditionalGeneration(config), processor, "gemma3")


def build_internvl(out: Path) -> Path:
    """InternVL: <img><IMG_CONTEXT> x N</img>, pixel-shuffled 32-px tiles (GotOcr2 image processor)."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    torch.manual_seed(0)
    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = chatml_tokenizer(list(named.values()), CHATML.replace("IMAGE", "<IMG_CONTEXT>"))
    tokenizer = with_named_tokens(tokenizer, out, named)
    tokenizer.chat_template = CHATML.replace("IMAGE", "<IMG_CONTEXT>")
    config = InternVLConfig(
        text_config=text_ids(tokenizer, "qwen2"),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [32, 32],
            "patch_size": [8, 8],
        },
        downsample_ratio=0.5,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        projector_hidden_act="gelu",
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=2
    )
    processor = without_video(
        InternVLProcessor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=tokenizer.chat_template,
    )
    return save(out, InternVLForConditionalGeneration(config), processor, "internvl")


BUILDERS.update(gemma3=build_gemma3, internvl=build_internvl)
