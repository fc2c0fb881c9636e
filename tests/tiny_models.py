"""Tiny random PaliGemma / Qwen2-VL / Qwen2.5-VL / LLaVA folders, built offline for the fine-tuning tests.

Each folder is what `save_pretrained` of the real model and processor writes (config, safetensors,
tokenizer with the family's special tokens and chat template, image processor), so the adapters'
real `from_pretrained(path)` code runs. The `family_dirs` fixture (tiny_families.py, loaded with
`pytest_plugins = ["tiny_families"]`) builds each folder once per session.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from PIL import Image

CORPUS = [
    "what color is the shape?",
    "answer en what is in the picture",
    "a red circle on a white background",
    "blue",
    "yes",
    "no",
    "How many bars are in the chart?",
    "The total revenue in 2019 was 42 million.",
    "What is the title of the document?",
    "You are a helpful assistant.",
    "USER: ASSISTANT:",
    string.printable,
]

# Qwen2-VL's chat template as shipped with Qwen/Qwen2-VL-7B-Instruct.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's template: note it closes assistant turns with a space, not EOS.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def tiny_text(hidden: int = 32) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": hidden // 2,
        "max_position_embeddings": 4096,
    }


def image(seed: int = 0, size: tuple[int, int] = (40, 32)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def build_paligemma(out: Path, version: int = 1, width: int = 32) -> Path:
    """PaliGemma (Gemma text) or PaliGemma 2 (Gemma 2 text) with a SigLIP tower: 16 image tokens.

    `width` 64 for 4-bit tests: on a CPU with AVX512-BF16, bitsandbytes' inference path (packed
    weights) needs every layer's input width to be a multiple of its 64-value quantisation block,
    as every real checkpoint's is; 32-wide layers crash there (`shape '[32, 0]' is invalid`)."""
    from transformers import (
        GemmaTokenizer,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    torch.manual_seed(0)
    tokenizer = GemmaTokenizer().train_new_from_iterator(CORPUS, vocab_size=300)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_seq_length=16)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tokenizer = processor.tokenizer  # now with <image> and the <loc>/<seg> tokens
    text = {
        **tiny_text(width),
        "model_type": "gemma2" if version == 2 else "gemma",
        "vocab_size": len(tokenizer),
    }
    text.update(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        text_config=text,
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer),
        projection_dim=width,
        hidden_size=width,
    )
    model = PaliGemmaForConditionalGeneration(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_qwen2_vl(out: Path, version: str = "qwen2_vl", pad_is_eos: bool = False) -> Path:
    """Qwen2-VL or Qwen2.5-VL (`version="qwen2_5_vl"`) with the instruct chat template."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    tokenizer = Qwen2Tokenizer().train_new_from_iterator(
        CORPUS, vocab_size=400, new_special_tokens=QWEN_SPECIALS
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>" if pad_is_eos else "<|endoftext|>"
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        **tiny_text(),
        "vocab_size": len(tokenizer),
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if version == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,
            "fullatt_block_indexes": [1],
        }
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    config = Config(text_config=text, vision_config=vision, **common)
    model = Model(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    )
    # Qwen2VLProcessor needs a video processor, which needs torchvision (not installed): the hub
    # folders hold the same files as separate tokenizer and image-processor configs anyway.
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def build_llava(out: Path) -> Path:
    """LLaVA-1.5 shaped: CLIP vision tower, 2-layer MLP projector, Llama LM, 16 image tokens."""
    from transformers import (
        CLIPImageProcessorPil,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    from tokenizers import pre_tokenizers

    base = LlamaTokenizer()
    # SentencePiece-like: merges never cross a word boundary (Llama's vocabulary has none that do).
    base._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=True
    )
    tokenizer = base.train_new_from_iterator(CORPUS, vocab_size=300, new_special_tokens=["<image>", "<pad>"])
    tokenizer.pad_token = "<pad>"
    tokenizer.chat_template = LLAVA_TEMPLATE
    text = {**tiny_text(), "model_type": "llama", "vocab_size": len(tokenizer)}
    text.update(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


BUILDERS = {
    "paligemma": lambda out: build_paligemma(out, 1),
    "paligemma2": lambda out: build_paligemma(out, 2),
    "paligemma_4bit": lambda out: build_paligemma(out, 1, width=64),
    "qwen2_vl": lambda out: build_qwen2_vl(out, "qwen2_vl"),
    "qwen2_5_vl": lambda out: build_qwen2_vl(out, "qwen2_5_vl"),
    "llava": build_llava,
}
