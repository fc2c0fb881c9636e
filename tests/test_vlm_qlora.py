"""QLoRA on vlmkit's own composed VLM: the LM really goes 4-bit, trains with LoRA, saves and merges.

bitsandbytes' CPU path wants layer input widths that are multiples of 64, so the LM is 64 wide.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_LM, tiny_spec
from test_peft import bitsandbytes_cpu_reason
from tiny_models import image
from vlmkit.config import LoraSpec, QuantizationSpec
from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError
from vlmkit.models.adapters import load_adapter
from vlmkit.models.build import build_vlm
from vlmkit.train.export import export_merged
from vlmkit.train.peft import apply_lora

pytestmark = pytest.mark.skipif(bitsandbytes_cpu_reason() is not None, reason=str(bitsandbytes_cpu_reason()))

LM_64 = {**TINY_LM, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32}
TEXTS = ["what color is the shape?", "red blue green", "How many bars are in the chart?", "42"]
SAMPLES = [
    Sample.vqa("a", image(0), "what color is the shape?", ["red"]),
    Sample.vqa("b", image(1, (64, 48)), "How many bars are in the chart?", ["42"]),
]
QUANT = QuantizationSpec(compute_dtype="float32")


def build(quantization=None):
    torch.manual_seed(0)
    return build_vlm(tiny_spec(language_model={"config": LM_64}), TEXTS, quantization=quantization)


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def loss_of(adapter) -> torch.Tensor:
    return adapter.model(**adapter.encode(SAMPLES)).loss


def logits(adapter) -> torch.Tensor:
    adapter.model.eval()
    with torch.no_grad():
        return adapter.model(**adapter.encode(SAMPLES, train=False)).logits.float()


def test_init_with_quantization_puts_the_lm_in_4bit_trains_saves_and_merges(tmp_path):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    full, adapter = build(), build(QUANT)
    lm = adapter.model.language_model
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in lm.modules()) == 2 * 7  # q k v o gate up down
    assert type(lm.get_output_embeddings()) is torch.nn.Linear  # the head stays full precision
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in adapter.model.projector.modules())
    assert nbytes(lm) < nbytes(full.model.language_model)
    with torch.no_grad():
        assert not torch.equal(loss_of(adapter), loss_of(full))  # not the full-precision model
    apply_lora(adapter, LoraSpec(r=4, dropout=0.0), quantized=True)
    assert any(isinstance(m, LoraLinear4bit) for m in adapter.model.modules())
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in adapter.model.parameters() if p.requires_grad], lr=5e-2)
    adapter.model.train()
    for _ in range(2):
        loss = loss_of(adapter)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in adapter.model.named_parameters() if n in before)
    trained = logits(adapter)
    adapter.save(tmp_path / "run" / "model")
    # The saved base is the dequantised one the LoRA weights were trained against.
    merged = load_adapter(export_merged(tmp_path / "run", tmp_path / "merged", format="vlmkit"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.model.modules())
    # bitsandbytes' 4-bit matmul and a plain one on the dequantised weights agree to float noise.
    assert torch.allclose(logits(merged), trained, atol=2e-3)
    # Started again from the saved run with quantization: 4-bit again, LoRA on top, same outputs.
    again = load_adapter(tmp_path / "run" / "model", quantization=QUANT)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in again.model.modules())
    assert torch.allclose(logits(again), trained, atol=2e-3)


def test_saved_vlm_folder_loads_with_quantization(tmp_path):
    import bitsandbytes as bnb

    build().save(tmp_path / "vlm")
    adapter = load_adapter(tmp_path / "vlm", quantization=QUANT, max_length=512)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in adapter.model.modules()) == 14
    assert torch.isfinite(loss_of(adapter))


def test_8bit_on_a_composed_vlm_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="bits: 8 is not supported for a VLM composed by vlmkit"):
        build(QuantizationSpec(bits=8))


def test_quantization_without_lora_is_refused(tmp_path):
    from conftest import tiny_config
    from vlmkit.config import RunConfig
    from vlmkit.train.runner import build_model

    config = RunConfig.model_validate(tiny_config(tmp_path, **{"model.quantization": {"bits": 4}}))
    with pytest.raises(ConfigError, match=r"model\.quantization needs model\.lora"):
        build_model(config, None)
