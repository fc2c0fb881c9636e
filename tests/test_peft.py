"""LoRA / QLoRA / 8-bit Adam / merged export on tiny random models (bitsandbytes runs on CPU here)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import image
from vlmkit.config import LoraSpec, QuantizationSpec
from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError
from vlmkit.models.adapters import load_adapter, model_type_of
from vlmkit.train.export import export_merged
from vlmkit.train.peft import apply_lora, bnb_config, lora_target_modules, set_trainable

pytest_plugins = ["tiny_families"]

SAMPLES = [
    Sample.vqa("a", image(0), "what color is the shape?", ["red"]),
    Sample.vqa("b", image(1, (64, 48)), "How many bars are in the chart?", ["42"]),
]


def bitsandbytes_cpu_reason() -> str | None:
    """Why 4-bit layers cannot run here, or None when they can (bitsandbytes >= 0.45 has a CPU backend)."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    except Exception as exc:
        return f"bitsandbytes 4-bit Linear4bit cannot run forward/backward on this CPU: {type(exc).__name__}: {exc}"
    return None


def train_steps(adapter, steps=2, lr=5e-2):
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    adapter.model.train()
    for _ in range(steps):
        loss = adapter.model(**adapter.encode(SAMPLES)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss


def logits(adapter, samples=SAMPLES):
    adapter.model.eval()
    with torch.no_grad():
        return adapter.model(**adapter.encode(samples, train=False)).logits.float()


@pytest.mark.parametrize("family", ["paligemma", "qwen2_vl", "llava"])
def test_all_linear_is_the_language_model_unless_asked(family_dirs, family):
    model = load_adapter(family_dirs(family)).model
    language = lora_target_modules(model, LoraSpec())
    assert language and all(name.startswith("model.language_model.") for name in language)
    with_vision = lora_target_modules(model, LoraSpec(vision=True))
    with_all = lora_target_modules(model, LoraSpec(vision=True, projector=True))
    projector = {"paligemma": "model.multi_modal_projector", "llava": "model.multi_modal_projector"}.get(
        family, "model.visual.merger"
    )
    assert not any(n.startswith(projector) for n in with_vision)
    assert any(n.startswith(projector) for n in with_all)
    assert set(language) < set(with_vision) < set(with_all)
    assert "lm_head" not in with_all
    assert lora_target_modules(model, LoraSpec(target_modules=["q_proj", "v_proj"])) == [
        n for n in language if n.endswith((".q_proj", ".v_proj"))
    ]
    with pytest.raises(ConfigError, match="matches no linear layer"):
        lora_target_modules(model, LoraSpec(target_modules=["no_such_layer"]))


@pytest.mark.parametrize("family", ["paligemma2", "qwen2_5_vl"])
def test_lora_step_changes_only_lora_weights(family_dirs, family):
    torch.manual_seed(0)
    adapter = load_adapter(family_dirs(family))
    apply_lora(adapter, LoraSpec(r=4, alpha=8, dropout=0.0), quantized=False)
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    trainable = {name for name, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    train_steps(adapter)
    for name, parameter in adapter.model.named_parameters():
        if name in trainable and "lora_B" in name:
            assert not torch.equal(parameter, before[name]), name
        if name not in trainable:
            assert torch.equal(parameter, before[name]), name


def test_gradient_checkpointing_reaches_lora_weights(family_dirs):
    adapter = load_adapter(family_dirs("qwen2_vl"))
    apply_lora(adapter, LoraSpec(r=4), quantized=False)
    adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    adapter.model.train()
    adapter.model(**adapter.encode(SAMPLES)).loss.backward()
    grads = {name: p.grad for name, p in adapter.model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # lora_B starts at zero (so lora_A's first gradient is zero); it must get a gradient through checkpointing.
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)


def test_lora_folder_saves_adapter_only_and_loads_back(family_dirs, tmp_path):
    torch.manual_seed(0)
    adapter = load_adapter(family_dirs("llava"))
    apply_lora(adapter, LoraSpec(r=4), quantized=False)
    train_steps(adapter)
    adapter.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "vlmkit_base.json", "tokenizer.json"} <= names
    assert "chat_template.jinja" in names and "model.safetensors" not in names and "config.json" not in names
    pointer = json.loads((tmp_path / "vlmkit_base.json").read_text())
    assert pointer == {"base_model": str(family_dirs("llava").resolve()), "model_type": "llava"}
    assert model_type_of(tmp_path) == "llava"
    again = load_adapter(tmp_path)
    assert torch.equal(logits(adapter), logits(again))
    merged = load_adapter(export_merged(tmp_path, tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").exists()
    torch.testing.assert_close(logits(merged), logits(adapter), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def merged(family_dirs, tmp_path_factory):
    """A trained Qwen2-VL LoRA run folder, its merged export, and the LoRA adapter's logits."""
    torch.manual_seed(0)
    adapter = load_adapter(family_dirs("qwen2_vl"))
    apply_lora(adapter, LoraSpec(r=4, vision=True, projector=True), quantized=False)
    train_steps(adapter)
    run = tmp_path_factory.mktemp("run")
    adapter.save(run / "model")
    out = export_merged(run, tmp_path_factory.mktemp("export") / "merged")
    return adapter, out


def test_merged_export_gives_the_adapter_models_logits(merged):
    adapter, out = merged
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    } <= names
    assert "adapter_config.json" not in names
    exported = load_adapter(out)
    assert torch.allclose(logits(adapter), logits(exported), atol=1e-4)


@pytest.mark.slow  # a fresh interpreter importing transformers + torch: ~13 s on 2 cores
def test_merged_export_loads_with_plain_transformers(merged, tmp_path):
    adapter, out = merged
    batch = adapter.encode(SAMPLES, train=False)
    torch.save(dict(batch), tmp_path / "batch.pt")
    script = (
        "import sys, torch; sys.modules['vlmkit'] = None\n"  # any vlmkit import would fail
        "from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer\n"
        f"path = {str(out)!r}\n"
        "model = AutoModelForImageTextToText.from_pretrained(path).eval()\n"
        "AutoTokenizer.from_pretrained(path); AutoImageProcessor.from_pretrained(path)\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad(): logits = model(**batch).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plain = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(logits(adapter), plain, atol=1e-4)


def test_bnb_config_is_qlora():
    config = bnb_config(QuantizationSpec())
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config(QuantizationSpec(bits=8)).load_in_8bit


@pytest.mark.skipif(bitsandbytes_cpu_reason() is not None, reason=str(bitsandbytes_cpu_reason()))
def test_qlora_loads_4bit_layers_trains_and_merges_unquantised(family_dirs, tmp_path):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    quantization = QuantizationSpec(compute_dtype="float32")
    adapter = load_adapter(family_dirs("paligemma_4bit"), quantization=quantization)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in adapter.model.modules())
    apply_lora(adapter, LoraSpec(r=4), quantized=True)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if "lora_B" in n}
    loss = train_steps(adapter)
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in adapter.model.named_parameters() if n in before)
    adapter.save(tmp_path / "run" / "model")
    out = export_merged(tmp_path / "run", tmp_path / "merged")
    exported = load_adapter(out)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in exported.model.modules())
    # The merge uses the unquantised base, so it equals base + LoRA in full precision.
    reference = load_adapter(tmp_path / "run" / "model")
    assert torch.allclose(logits(reference), logits(exported), atol=1e-4)


def test_adamw_bnb_8bit_runs_on_cpu(family_dirs, tmp_path):
    """`optim: adamw_bnb_8bit` goes straight to TrainingArguments; bitsandbytes 8-bit state works on CPU."""
    import bitsandbytes as bnb
    from transformers import Trainer, TrainingArguments

    adapter = load_adapter(family_dirs("qwen2_vl"))
    args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_bnb_8bit", report_to="none", use_cpu=True)
    trainer = Trainer(model=adapter.model, args=args)
    optimizer = trainer.create_optimizer()
    inner = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(inner, bnb.optim.AdamW) and inner.args.optim_bits == 8
    adapter.model(**adapter.encode(SAMPLES)).loss.backward()
    optimizer.step()
    big = next(p for p in adapter.model.parameters() if p.numel() >= 4096)  # 8-bit state from 4096 values up
    assert inner.state[big]["state1"].dtype == torch.uint8


def test_freeze_on_a_lora_vlmkit_vlm_touches_lora_weights_only(tiny_vlm_dir):
    adapter = load_adapter(tiny_vlm_dir)
    apply_lora(adapter, LoraSpec(r=2, projector=True), quantized=False)
    model = adapter.model
    set_trainable(model, vision=True, projector=False, lm=True)  # what the runner's `freeze:` calls
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".projector." in n for n in trainable)


@pytest.mark.parametrize("modules_to_save", [None, ["projector"]])
def test_a_composed_vlm_with_lora_saves_its_base_and_loads_back(tmp_path, modules_to_save):
    """A composed VLM's base exists nowhere on disk: its LoRA folder carries it in base/."""
    from safetensors import safe_open

    from conftest import tiny_spec
    from vlmkit.models.build import build_vlm

    torch.manual_seed(0)
    texts = [m["content"] for s in SAMPLES for m in s.messages]
    adapter = build_vlm(tiny_spec(), texts)
    apply_lora(adapter, LoraSpec(r=4, modules_to_save=modules_to_save), quantized=False)
    train_steps(adapter)
    adapter.save(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()  # the top folder holds the adapter only
    assert json.loads((tmp_path / "vlmkit_base.json").read_text())["base_model"] == "base"
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora_" in n or "base_layer" in n or "modules_to_save" in n for n in names)
    again = load_adapter(tmp_path)
    assert torch.equal(logits(adapter), logits(again))
    merged = load_adapter(export_merged(tmp_path, tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").exists()
    torch.testing.assert_close(logits(merged), logits(adapter), rtol=1e-4, atol=1e-4)
