"""The seed recipes: each parses as shipped, then trains for two steps with a tiny model of its family.

The recipes name real checkpoints and data sets; here the model is swapped for a tiny random one
of the same family (saved to a temp folder) and the data for a fixture written in the recipe's
layout. Everything else (LoRA, 4-bit, optimiser, precision, schedules) runs as written.
"""

import json
from importlib.resources import files

import pytest
import torch

from tiny_models import CORPUS
from vlmkit.config import load_config, parse_config, read_yaml
from vlmkit.errors import ConfigError
from vlmkit.eval.metrics import get_metric
from vlmkit.train.runner import train
from vqa_fixtures import write_chartqa, write_docvqa, write_vqav2_hf

pytest_plugins = ["tiny_families"]

RECIPES = [
    "seed000_dinov2_gemma2.yaml",
    "seed002_paligemma_vqav2_qlora.yaml",
    "seed003_qwen2vl_chartqa_lora.yaml",
    "seed004_paligemma_docvqa_lora.yaml",
]


def recipe(name):
    return files("vlmkit") / "configs" / name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_as_shipped(name):
    config = load_config(str(recipe(name)))
    assert config.name == name.removesuffix(".yaml")
    assert config.data.train is not None and config.data.eval is not None


def test_set_addresses_a_stage_by_name_or_index():
    demo = str(recipe("demo.yaml"))
    config = load_config(
        demo, ["stages.vqa.training.num_train_epochs=2", "stages.0.training.learning_rate=5e-4"]
    )
    stages = {stage.name: stage for stage in config.stages}
    assert stages["vqa"].training["num_train_epochs"] == 2
    assert stages["shape"].training["learning_rate"] == 5e-4
    assert stages["what"].training == load_config(demo).stages[1].training  # the others untouched


def test_yaml_no_yes_on_off_stay_strings_for_trainingarguments(tmp_path):
    """YAML 1.1 reads `no` as False; `save_strategy: no` (and `--set training.save_strategy=no`)
    must reach TrainingArguments as the string it accepts."""
    from transformers import TrainingArguments

    demo = str(recipe("demo.yaml"))
    config = load_config(demo, ["training.save_strategy=no", "training.report_to=none"])
    assert config.training["save_strategy"] == "no"
    args = TrainingArguments(output_dir=str(tmp_path), **config.training)
    assert args.save_strategy == "no"
    assert read_yaml("a: no\nb: on\nc: true\nd: False\ne: 1e-3") == {
        "a": "no", "b": "on", "c": True, "d": False, "e": 0.001
    }  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.align.training.max_steps=1", "no item 'align'; name one of shape, what, vqa"),
        ("stages.7.training.max_steps=1", "or an index below 3"),
        ("stages.vqa=1", "name an item of the list"),
    ],
)
def test_set_names_a_missing_stage(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(recipe("demo.yaml")), [override])


def shrink(raw, tmp_path, data_path):
    """Two steps on CPU; data from the fixture; eval on two samples."""
    raw["output_dir"] = str(tmp_path / "run")
    raw["training"].update(
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )
    for key in ("train", "eval"):
        raw["data"][key]["path"] = str(data_path)
    try:
        get_metric(raw["eval"]["metric"])
    except Exception:
        raw["eval"]["metric"] = "exact_match"
    raw["eval"].update(limit=2, max_new_tokens=2, batch_size=2)
    return raw


def check_run(result, raw):
    metrics = result.stages[0]
    assert metrics["global_step"] == 2 and metrics["final_loss"] is not None
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    assert (
        result.model_dir / ("adapter_config.json" if raw["model"].get("lora") else "config.json")
    ).is_file()
    assert result.eval_summary is not None and result.eval_summary["n"] == 2


def write_splits(writer, folder, splits, **kwargs):
    for split in splits:
        writer(folder, split=split, **kwargs)
    return folder


def test_seed002_paligemma_vqav2_qlora(family_dirs, tmp_path):
    """QLoRA runs on CPU with bitsandbytes >= 0.45, so the quantization section stays in."""
    data = write_splits(write_vqav2_hf, tmp_path / "vqav2", ["train", "validation"], n=20)
    raw = shrink(read_yaml(recipe(RECIPES[1]).read_text()), tmp_path, data)
    raw["model"]["pretrained"] = str(family_dirs("paligemma_4bit"))
    result = train(parse_config(raw))
    check_run(result, raw)
    assert raw["model"]["quantization"]["bits"] == 4


def test_seed003_qwen2vl_chartqa_lora(family_dirs, tmp_path):
    data = write_splits(write_chartqa, tmp_path / "chartqa", ["train", "test"], n=20)
    raw = shrink(read_yaml(recipe(RECIPES[2]).read_text()), tmp_path, data)
    raw["model"]["pretrained"] = str(family_dirs("qwen2_vl"))
    # The recipe's 256..1024 vision tokens suit a 7B; the tiny model gets 1..16.
    raw["model"]["adapter_options"] = {"min_pixels": 16 * 16, "max_pixels": 64 * 64}
    result = train(parse_config(raw))
    check_run(result, raw)
    # TRL's cookbook trains at a constant rate: both logged steps at the recipe's 2e-4
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert rates == [2e-4, 2e-4]


def test_seed004_paligemma_docvqa_lora(family_dirs, tmp_path):
    data = write_splits(write_docvqa, tmp_path / "docvqa", ["train", "validation"], n=4)
    raw = shrink(read_yaml(recipe(RECIPES[3]).read_text()), tmp_path, data)
    raw["model"]["pretrained"] = str(family_dirs("paligemma2"))
    result = train(parse_config(raw))
    check_run(result, raw)


@pytest.fixture
def dinov2_gemma2(tmp_path):
    """A tiny DINOv2 (224 px, patch 14: 257 tokens) and a tiny Gemma 2, saved as pretrained folders."""
    from transformers import (
        BitImageProcessorPil,
        Dinov2Config,
        Dinov2Model,
        Gemma2Config,
        Gemma2ForCausalLM,
        GemmaTokenizer,
    )

    torch.manual_seed(0)
    vision = tmp_path / "dinov2"
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=224,
            patch_size=14,
        )
    ).save_pretrained(vision)
    BitImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(vision)
    language = tmp_path / "gemma2"
    tokenizer = GemmaTokenizer().train_new_from_iterator(CORPUS, vocab_size=300)
    Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(language)
    tokenizer.save_pretrained(language)
    return vision, language


def test_seed000_dinov2_gemma2(dinov2_gemma2, tmp_path):
    vision, language = dinov2_gemma2
    data = write_splits(write_vqav2_hf, tmp_path / "vqav2", ["train", "validation"], n=8)
    raw = shrink(read_yaml(recipe(RECIPES[0]).read_text()), tmp_path, data)
    raw["model"]["init"]["vision"] = {"pretrained": str(vision)}
    raw["model"]["init"]["language_model"] = {"pretrained": str(language)}
    config = parse_config(raw)
    result = train(config)
    check_run(result, raw)
    from vlmkit.models.adapters import load_adapter

    model = load_adapter(result.model_dir).model
    assert model.config.num_image_tokens == 257  # CLS + 16x16 patches: the seed's num_patches
    assert model.language_model.config.attention_dropout == 0.1
