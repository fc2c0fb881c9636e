"""Memory planning from configs: exact parameter counts, and the orderings the estimates must keep."""

import pytest

from vlmkit.config import LoraSpec, parse_config
from vlmkit.models.adapters import load_adapter
from vlmkit.train.peft import apply_lora
from vlmkit.train.plan import format_plan, plan_memory

pytest_plugins = ["tiny_families"]


def config(folder, **model):
    training = model.pop("training", {"per_device_train_batch_size": 4})
    return parse_config({"model": {"pretrained": str(folder), **model}, "training": training})


@pytest.mark.parametrize("family", ["paligemma", "qwen2_vl", "qwen2_5_vl", "llava"])
def test_parameter_counts_are_exact(family_dirs, family):
    model = load_adapter(family_dirs(family)).model
    plan = plan_memory(config(family_dirs(family)))
    assert plan["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    counts = plan["parameters"]
    assert counts["vision"] + counts["projector"] + counts["language"] == counts["total"]


@pytest.mark.parametrize(
    ("family", "spec"),
    [
        ("paligemma", {"r": 4, "vision": True}),
        (
            "qwen2_vl",
            {
                "r": 4,
                "projector": True,
                "target_modules": ["q_proj", "v_proj"],
                "modules_to_save": ["lm_head"],
            },
        ),
    ],
)
def test_lora_trainable_count_matches_peft(family_dirs, family, spec):
    adapter = load_adapter(family_dirs(family))
    apply_lora(adapter, LoraSpec(**spec), quantized=False)
    actual = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
    assert plan_memory(config(family_dirs(family), lora=spec))["parameters"]["trainable"] == actual


def test_weights_shrink_with_precision(family_dirs):
    folder = family_dirs("llava")
    weights = {
        name: plan_memory(config(folder, **extra))["per_gpu_bytes"]["weights"]
        for name, extra in {
            "fp32": {},
            "bf16": {"dtype": "bfloat16"},
            "4bit": {"quantization": {"bits": 4}},
        }.items()
    }
    assert weights["4bit"] < weights["bf16"] < weights["fp32"]
    assert weights["fp32"] == 2 * weights["bf16"]


def test_sharding_and_checkpointing_reduce_per_gpu_memory(family_dirs):
    raw = config(family_dirs("qwen2_vl"), training={"per_device_train_batch_size": 8, "optim": "adamw_torch"})
    ddp = plan_memory(raw, gpus=8, strategy="ddp")
    zero2 = plan_memory(raw, gpus=8, strategy="zero2")
    zero3 = plan_memory(raw, gpus=8, strategy="zero3")
    assert zero3["per_gpu_bytes"]["total"] < zero2["per_gpu_bytes"]["total"] < ddp["per_gpu_bytes"]["total"]
    assert zero3["per_gpu_bytes"]["weights"] == pytest.approx(ddp["per_gpu_bytes"]["weights"] / 8)
    assert (
        plan_memory(raw, gpus=1, strategy="zero3")["per_gpu_bytes"]["total"] == ddp["per_gpu_bytes"]["total"]
    )
    acts = ddp["activations_gib"]
    assert acts["with_checkpointing"] < acts["without_checkpointing"]
    assert set(ddp["by_strategy_gib"]) == {"ddp", "zero2", "zero3", "fsdp"}


def test_eight_bit_adam_quarter_of_fp32_state(family_dirs):
    folder = family_dirs("paligemma")
    torch_adam = plan_memory(config(folder, training={"optim": "adamw_torch"}))["per_gpu_bytes"]["optimizer"]
    bnb_adam = plan_memory(config(folder, training={"optim": "adamw_bnb_8bit"}))["per_gpu_bytes"]["optimizer"]
    assert bnb_adam == torch_adam / 4


def test_composed_vlm_plans_from_part_configs():
    from conftest import TINY_LM, TINY_VISION

    raw = parse_config(
        {
            "model": {
                "init": {
                    "vision": {"config": TINY_VISION},
                    "language_model": {"config": {**TINY_LM, "vocab_size": 100}},
                    "image_size": 32,
                },
                "max_length": 64,
            },
            "training": {"per_device_train_batch_size": 2},
        }
    )
    plan = plan_memory(raw, gpus=4, strategy="fsdp")
    counts = plan["parameters"]
    assert counts["vision"] > 0 and counts["projector"] > 0 and counts["language"] > 0
    assert plan["sequence_length"] == 64
    text = format_plan(plan)
    assert "4 GPU(s), fsdp" in text and "zero3" in text and "total" in text


def test_bad_strategy(family_dirs):
    from vlmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy 'tp'"):
        plan_memory(config(family_dirs("llava")), strategy="tp")


def objective_plan(folder, **extra):
    raw = {"model": {"pretrained": str(folder)}, "training": {"per_device_train_batch_size": 2}, **extra}
    return plan_memory(parse_config(raw))


def test_dpo_and_grpo_plans_count_their_rows_reference_and_kv_cache(family_dirs):
    folder = family_dirs("paligemma")
    sft = objective_plan(folder)["per_gpu_bytes"]
    dpo = objective_plan(folder, objective="dpo")
    assert dpo["objective"] == {"name": "dpo", "rows": 4, "logit_passes": 1, "reference": "cached"}
    assert dpo["per_gpu_bytes"]["activations"] == pytest.approx(2 * sft["activations"])
    assert dpo["per_gpu_bytes"]["weights"] == sft["weights"] and dpo["per_gpu_bytes"]["reference"] == 0
    lora_dpo = objective_plan(folder, objective="dpo", model={"pretrained": str(folder), "lora": {"r": 4}})
    assert lora_dpo["objective"]["reference"] == "adapter" and lora_dpo["objective"]["logit_passes"] == 2
    four = objective_plan(folder, objective="grpo", grpo={"num_generations": 4})
    eight = objective_plan(folder, objective="grpo", grpo={"num_generations": 8})
    assert (
        eight["objective"]["rows"] == 16 and eight["per_gpu_bytes"]["total"] > four["per_gpu_bytes"]["total"]
    )
    kl = objective_plan(folder, objective="grpo", grpo={"beta": 0.04, "reference": "copy"})
    assert kl["per_gpu_bytes"]["reference"] == pytest.approx(kl["per_gpu_bytes"]["weights"])
    assert "objective: grpo" in format_plan(kl)
