"""`vlmkit export` of a composed VLM: a LLaVA folder plain transformers loads and decodes alike.

Each case builds a tiny random VLM, saves it as a run's model, exports it, and loads the export
in a subprocess that never imports vlmkit (AutoModelForImageTextToText + AutoProcessor, the
image given as a content part); its prompt ids, next-token logits and greedy tokens must be
vlmkit's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_LM, tiny_spec
from tiny_models import image
from vlmkit.config import LoraSpec
from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError
from vlmkit.models.adapters import load_adapter, model_type_of
from vlmkit.models.build import build_vlm
from vlmkit.train.export import export_merged
from vlmkit.train.peft import apply_lora

QUESTION = "what color is the shape?"
TEXTS = [QUESTION, "red blue green yes no", "a circle a square", "How many bars are in the chart?"]

PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, image_path, question, out = sys.argv[1:5]
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path).convert("RGB")},
                                         {"type": "text", "text": question}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits[0, -1]
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
json.dump({"class": type(model).__name__, "vlmkit_imported": any(m.startswith("vlmkit") for m in sys.modules),
           "input_ids": inputs["input_ids"][0].tolist(), "logits": logits.tolist(), "tokens": new.tolist()},
          open(out, "w"))
"""


def tower(model_type: str) -> dict:
    width = (
        {"mlp_ratio": 2} if model_type == "dinov2" else {"intermediate_size": 64}
    )  # DINOv2 has no intermediate_size
    return {
        "model_type": model_type,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        **width,
        "patch_size": 8,
    }


def build(model_type: str, **spec: object):
    torch.manual_seed(0)
    vision = {"config": {**tower(model_type), **(spec.pop("tower", None) or {})}}  # type: ignore[dict-item]
    adapter = build_vlm(tiny_spec(vision=vision, **spec), TEXTS)
    with torch.no_grad():  # a random LM whose greedy tokens vary, so a wrong feature shows
        for parameter in adapter.model.projector.parameters():
            parameter.mul_(20.0)
    return adapter


def vlmkit_side(adapter, image_path: Path) -> dict:
    adapter.model.eval()
    batch = adapter.encode([Sample.vqa("q", str(image_path), QUESTION, ["red"])], train=False)
    with torch.no_grad():
        logits = adapter.model(**batch).logits[0, -1]
        tokens = adapter.model.generate(
            **batch,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=adapter.stop_token_ids(),
            pad_token_id=adapter.tokenizer.pad_token_id,
        )[0]
    return {"input_ids": batch["input_ids"][0].tolist(), "logits": logits, "tokens": tokens.tolist()}


def plain_transformers(folder: Path, image_path: Path, tmp_path: Path) -> dict:
    out = tmp_path / "plain.json"
    subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder), str(image_path), QUESTION, str(out)],
        check=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.read_text())


def assert_same(folder: Path, reference, tmp_path: Path) -> dict:
    image_path = tmp_path / "image.png"
    image(3, (40, 36)).save(image_path)
    ours = vlmkit_side(reference, image_path)
    theirs = plain_transformers(folder, image_path, tmp_path)
    assert theirs["class"] == "LlavaForConditionalGeneration"
    assert not theirs["vlmkit_imported"]
    assert theirs["input_ids"] == ours["input_ids"]
    assert torch.allclose(torch.tensor(theirs["logits"]), ours["logits"].float(), atol=1e-4)
    assert theirs["tokens"] == ours["tokens"]
    return theirs


@pytest.mark.parametrize(
    ("model_type", "spec"),
    [
        ("clip_vision_model", {"projector": "mlp", "feature_select": "cls_patch"}),
        ("clip_vision_model", {"projector": "mlp", "feature_select": "patch", "feature_layer": -2}),
        (
            "siglip_vision_model",
            {"projector": "mlp", "feature_select": "patch", "image_placement": "after_text"},
        ),
        ("dinov2", {"projector": "linear", "feature_select": "patch", "feature_layer": -2}),
        ("dinov2", {"projector": "mlp", "feature_select": "patch"}),
        ("vit", {"projector": "mlp", "feature_select": "cls_patch"}),
    ],
    ids=[
        "clip-cls_patch",
        "clip-patch-layer-2",
        "siglip-after_text",
        "dinov2-linear",
        "dinov2-last-layer-as-vit",
        "vit-last-layer-norm",
    ],
)
def test_export_is_a_llava_folder_plain_transformers_decodes_alike(tmp_path, model_type, spec):
    adapter = build(model_type, **spec)
    adapter.save(tmp_path / "run" / "model")
    out = export_merged(tmp_path / "run", tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    as_vit = model_type == "dinov2" and adapter.model.config.vision_feature_layer == -1
    assert config["vision_config"]["model_type"] == ("vit" if as_vit else model_type)
    assert config["text_config"]["model_type"] == TINY_LM["model_type"]
    assert config["image_seq_length"] == adapter.model.config.num_image_tokens
    assert (out / "processor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    assert "LlavaForConditionalGeneration" in (out / "README.md").read_text()
    theirs = assert_same(out, adapter, tmp_path)
    image_id = adapter.model.config.image_token_id
    assert theirs["input_ids"].count(image_id) == adapter.model.config.num_image_tokens


def test_lora_run_merges_into_the_llava_folder(tmp_path):
    """A trained LoRA run (composed VLM, base in base/) exports merged; transformers decodes as the run."""
    adapter = build("clip_vision_model", projector="mlp")
    apply_lora(adapter, LoraSpec(r=4, alpha=8, dropout=0.0, projector=True), quantized=False)
    with torch.no_grad():
        for name, parameter in adapter.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    adapter.save(tmp_path / "run" / "model")
    out = export_merged(tmp_path / "run", tmp_path / "export")
    assert model_type_of(out) == "llava"
    assert not any("lora" in name for name in json.loads((out / "config.json").read_text()))
    assert_same(out, load_adapter(tmp_path / "run" / "model"), tmp_path)


def test_models_without_a_llava_form_stay_vlmkit_folders_that_say_why(tiny_vlm_dir, tmp_path):
    out = export_merged(tiny_vlm_dir, tmp_path / "auto")
    assert model_type_of(out) == "vlmkit_vlm"
    readme = (out / "README.md").read_text()
    assert "resnet vision tower gives feature maps" in readme and "load_adapter" in readme
    with pytest.raises(ConfigError, match="no LLaVA form: its resnet vision tower"):
        export_merged(tiny_vlm_dir, tmp_path / "forced", format="llava")


@pytest.mark.parametrize(
    ("model_type", "spec", "reason"),
    [
        (
            "clip_vision_model",
            {"projector": "resampler", "projector_kwargs": {"num_queries": 4}},
            "resampler",
        ),
        ("clip_vision_model", {"projector": "mlp", "projector_hidden_size": 48}, "48 wide inside"),
        ("clip_vision_model", {"projector": "mlp", "feature_select": "cls"}, "CLS token alone"),
        ("dinov2", {"projector": "mlp", "tower": {"use_swiglu_ffn": True}}, "SwiGLU"),
    ],
)
def test_each_unmappable_choice_is_named(tmp_path, model_type, spec, reason):
    from vlmkit.models.llava_format import llava_incompatibility

    adapter = build(model_type, **spec)
    assert reason in (llava_incompatibility(adapter.model) or "")
    adapter.save(tmp_path / "model")
    with pytest.raises(ConfigError, match=reason):
        export_merged(tmp_path / "model", tmp_path / "export", format="llava")


def test_format_vlmkit_keeps_vlmkit_folder(tmp_path):
    adapter = build("clip_vision_model", projector="mlp")
    adapter.save(tmp_path / "model")
    out = export_merged(tmp_path / "model", tmp_path / "export", format="vlmkit")
    assert model_type_of(out) == "vlmkit_vlm"
    assert "--format vlmkit" in (out / "README.md").read_text()


def test_dinov2_as_vit_gives_dinov2s_normed_output_as_the_last_hidden_state():
    """The ViT that `dinov2_as_vit` writes is DINOv2 itself: layer scales folded into the linear
    layers, position embeddings interpolated at the model's image size (here not the tower's own)."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    from vlmkit.models.dinov2_as_vit import vit_config, vit_state_dict

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64, patch_size=8
    )
    dinov2 = Dinov2Model(config).eval()
    with torch.no_grad():  # layer scales far from 1, so an unfolded scale shows
        for name, parameter in dinov2.named_parameters():
            if "lambda1" in name:
                parameter.uniform_(0.2, 3.0)
    vit = ViTModel(ViTConfig(**{k: v for k, v in vit_config(dinov2, 32).items() if k != "model_type"}))
    vit.load_state_dict(vit_state_dict(dinov2, 32), strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = dinov2(pixel_values=pixels).last_hidden_state
        got = vit.eval()(pixel_values=pixels, output_hidden_states=True)
    assert torch.allclose(got.hidden_states[-1], expected, atol=1e-5)
    assert torch.allclose(got.last_hidden_state, expected, atol=1e-5)
