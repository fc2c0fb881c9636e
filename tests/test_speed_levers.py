"""model.speed levers on tiny models (CPU): each must change what runs and leave the numbers alone."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from conftest import TINY_DINOV2, tiny_spec
from vlmkit.config import SpeedSpec, parse_config
from vlmkit.errors import ConfigError
from vlmkit.models.adapters import load_adapter
from vlmkit.models.loss import labelled_loss
from vlmkit.train.levers import apply_speed

pytest_plugins = ["tiny_families"]


def _samples(easyvqa_samples, n=4):
    # two questions about image 0 and two other images: de-duplicated rows plus distinct ones
    first = easyvqa_samples[0].image
    picked = [s for s in easyvqa_samples if s.image == first][:2]
    others = {s.image: s for s in easyvqa_samples if s.image != first}  # one question per image
    return picked + list(others.values())[: n - 2]


# -- labelled-positions loss for transformers families -----------------------------------------------
@pytest.mark.parametrize("family", ["paligemma2", "qwen2_vl", "llava"])
def test_labelled_loss_equals_family_loss_without_full_logits(family, family_dirs, easyvqa_samples):
    adapter = load_adapter(family_dirs(family))
    batch = adapter.encode(_samples(easyvqa_samples, 3), train=True)
    model = adapter.model.train()

    reference = model(**batch)
    reference.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    apply_speed(adapter, SpeedSpec())
    ours = model(**batch)
    ours.loss.backward()
    assert ours.logits is None, "the levered forward must not build vocabulary logits"
    assert reference.logits is not None
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=5e-6)

    apply_speed(adapter, SpeedSpec(labelled_loss=False))  # off again: the family's own forward
    assert model(**batch).logits is not None


def test_levered_forward_still_generates(family_dirs, easyvqa_samples):
    adapter = load_adapter(family_dirs("qwen2_vl"))
    samples = _samples(easyvqa_samples, 2)
    before = adapter.generate(samples, max_new_tokens=4)
    apply_speed(adapter, SpeedSpec())
    assert adapter.generate(samples, max_new_tokens=4) == before


# -- fused linear cross-entropy ---------------------------------------------------------------------
def _loss_inputs(cap=None):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16)
    labels = torch.full((2, 7), -100)
    labels[0, 4:] = torch.tensor([3, 5, 7])
    labels[1, 2:4] = torch.tensor([1, 9])
    head = torch.nn.Linear(16, 50, bias=False)
    return hidden, labels, head


def test_fused_flag_falls_back_to_the_exact_loss_off_cuda():
    hidden, labels, head = _loss_inputs()
    plain = labelled_loss(hidden, labels, head, softcap=30.0)
    fused = labelled_loss(hidden, labels, head, softcap=30.0, fused=True)  # CPU tensors: plain path
    assert torch.equal(plain, fused)


def test_fused_flag_routes_to_liger_when_usable(monkeypatch):
    """With the kernel usable, the loss comes from liger's function (a stand-in here: no CUDA)."""
    calls = []

    def fake_liger(x, weight, target, bias=None, ignore_index=-100, reduction="mean", softcap=None):
        calls.append({"rows": x.shape[0], "softcap": softcap, "reduction": reduction})
        logits = x @ weight.T
        logits = torch.tanh(logits / softcap) * softcap if softcap else logits
        return torch.nn.functional.cross_entropy(logits.float(), target, reduction=reduction)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = fake_liger
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    monkeypatch.setattr("vlmkit.models.loss.fused_usable", lambda hidden, head: True)
    hidden, labels, head = _loss_inputs()
    fused = labelled_loss(hidden, labels, head, softcap=30.0, fused=True)
    assert calls == [{"rows": 5, "softcap": 30.0, "reduction": "sum"}]
    torch.testing.assert_close(fused, labelled_loss(hidden, labels, head, softcap=30.0))


def test_fused_needs_liger_at_config_load(monkeypatch):
    monkeypatch.setattr("vlmkit.models.loss.liger_available", lambda: False)
    raw = {"model": {"pretrained": "x", "speed": {"fused_cross_entropy": True}}}
    with pytest.raises(ConfigError, match=r"model\.speed: .*liger-kernel"):
        parse_config(raw)


# -- frozen-tower feature cache ---------------------------------------------------------------------
@pytest.fixture
def dinov2_vlm(easyvqa_samples):
    from vlmkit.models.build import build_vlm

    torch.manual_seed(0)
    texts = [m["content"] for s in easyvqa_samples for m in s.messages]
    return build_vlm(tiny_spec(vision={"config": TINY_DINOV2}), texts)


def _trainer(model, tmp_path):
    from transformers import TrainingArguments

    from vlmkit.train.trainer import VlmkitTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False
    )
    return VlmkitTrainer(model=model, args=args)


def test_feature_cache_skips_the_frozen_tower_and_keeps_the_loss(dinov2_vlm, easyvqa_samples, tmp_path):
    adapter = dinov2_vlm
    model = adapter.model.train()
    model.set_trainable(vision=False)
    trainer = _trainer(model, tmp_path)
    samples = _samples(easyvqa_samples)
    tower_rows = []
    model.vision_tower.register_forward_pre_hook(
        lambda _m, _args, kwargs: tower_rows.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )

    plain_batch = adapter.encode(samples, train=True)
    assert "image_keys" not in plain_batch
    plain = trainer.compute_loss(model, dict(plain_batch))
    plain.backward()
    plain_grad = model.projector.net[1].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    assert tower_rows == [3]  # 3 distinct images in the batch

    apply_speed(adapter, SpeedSpec(vision_feature_cache=True))
    cache = model.vision_feature_cache
    batch = adapter.encode(samples, train=True)
    assert len(batch["image_keys"]) == batch["pixel_values"].shape[0] == 3
    first = trainer.compute_loss(model, dict(batch))  # fills the cache
    second = trainer.compute_loss(model, dict(batch))  # every image cached: the tower must not run
    assert tower_rows == [3, 3]
    assert (cache.hits, cache.misses, len(cache)) == (3, 3, 3)
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, plain, rtol=0, atol=1e-6)
    second.backward()
    torch.testing.assert_close(model.projector.net[1].weight.grad, plain_grad, rtol=1e-5, atol=1e-7)

    # A batch with one new image runs the tower on that row only.
    other = [s for s in easyvqa_samples if s.image not in {x.image for x in samples}][:1]
    trainer.compute_loss(model, dict(adapter.encode(samples[:1] + other, train=True)))
    assert tower_rows == [3, 3, 1]

    # A tower that trains bypasses (and empties) the cache.
    model.set_trainable(vision=True)
    trainer.compute_loss(model, dict(batch))
    assert tower_rows[-1] == 3 and len(cache) == 0


def test_a_frozen_batchnorm_tower_runs_in_eval_mode_so_its_cached_features_are_exact(
    easyvqa_samples, tmp_path
):
    from vlmkit.models.build import build_vlm

    texts = [m["content"] for s in easyvqa_samples for m in s.messages]
    adapter = build_vlm(tiny_spec(), texts)  # ResNet tower: BatchNorm
    model = adapter.model
    model.set_trainable(vision=False)
    model.train()
    assert not model.vision_tower.training and model.language_model.training
    stats = {k: v.clone() for k, v in model.vision_tower.state_dict().items() if "running" in k}
    trainer = _trainer(model, tmp_path)
    samples = _samples(easyvqa_samples)
    plain = trainer.compute_loss(model, dict(adapter.encode(samples, train=True)))
    apply_speed(adapter, SpeedSpec(vision_feature_cache=True))
    batch = adapter.encode(samples, train=True)
    trainer.compute_loss(model, dict(batch))
    cached = trainer.compute_loss(model, dict(batch))
    assert model.vision_feature_cache.hits == 3
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-6)
    for key, value in model.vision_tower.state_dict().items():
        if key in stats:
            assert torch.equal(value, stats[key]), key  # frozen BatchNorm statistics do not drift
    model.set_trainable(vision=True)
    model.train()
    assert model.vision_tower.training


def test_feature_cache_is_for_vlmkit_models_only(family_dirs):
    adapter = load_adapter(family_dirs("paligemma"))
    with pytest.raises(ConfigError, match="vlmkit's own VLM"):
        apply_speed(adapter, SpeedSpec(vision_feature_cache=True))


# -- generation: static KV cache --------------------------------------------------------------------
def _generation_cache(adapter, samples):
    """The cache object the model's own `generate` decoded with, from its documented output
    (`return_dict_in_generate`): `cache` from transformers 5.24, `past_key_values` before."""
    batch = adapter.encode(samples, train=False)
    config = adapter.generation_config(max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    output = adapter.model.generate(**batch, generation_config=config)
    cache = output.cache if "cache" in output else output.past_key_values
    assert cache is not None, "generate returned no cache"
    return type(cache).__name__


@pytest.mark.parametrize("which", ["vlmkit", "qwen2_vl"])
def test_static_cache_generates_the_same_tokens(which, tiny_vlm_dir, family_dirs, easyvqa_samples):
    adapter = load_adapter(tiny_vlm_dir if which == "vlmkit" else family_dirs(which))
    samples = _samples(easyvqa_samples, 3)
    dynamic = adapter.generate(samples, max_new_tokens=5)
    assert _generation_cache(adapter, samples) == "DynamicCache"
    apply_speed(adapter, SpeedSpec(generation_cache="static"))
    assert adapter.generate(samples, max_new_tokens=5) == dynamic
    assert _generation_cache(adapter, samples) == "StaticCache"


def test_compile_generation_needs_a_static_cache():
    raw = {"model": {"pretrained": "x", "speed": {"compile_generation": True}}}
    with pytest.raises(ConfigError, match="compile_generation needs generation_cache: static"):
        parse_config(raw)
    spec = parse_config(
        {"model": {"pretrained": "x", "speed": {"compile_generation": True, "generation_cache": "static"}}}
    ).model.speed
    from vlmkit.train.levers import generation_settings

    assert generation_settings(spec) == {"cache_implementation": "static", "disable_compile": False}
    assert generation_settings(SpeedSpec(generation_cache="static")) == {
        "cache_implementation": "static",
        "disable_compile": True,
    }


# -- the language model's attention kernel ----------------------------------------------------------
def _count_eager_calls(monkeypatch, language_model):
    attention = next(m for m in language_model.modules() if type(m).__name__.endswith("Attention"))
    module = sys.modules[type(attention).__module__]
    calls = []
    original = module.eager_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", counting)
    return calls


@pytest.mark.parametrize("which", ["vlmkit", "qwen2_vl", "llava"])
def test_attention_lever_switches_the_language_models_kernel_and_keeps_the_loss(
    which, tiny_vlm_dir, family_dirs, easyvqa_samples, monkeypatch
):
    from vlmkit.models.attention import language_model_attention

    adapter = load_adapter(tiny_vlm_dir if which == "vlmkit" else family_dirs(which))
    model = adapter.model.eval()
    lm = model.language_model if which == "vlmkit" else model.model.language_model
    calls = _count_eager_calls(monkeypatch, lm)
    batch = adapter.encode(_samples(easyvqa_samples, 3), train=True)
    with torch.no_grad():
        before = model(**batch).loss
        assert not calls and language_model_attention(model) == "sdpa"
        apply_speed(adapter, SpeedSpec(attention="eager"))
        after = model(**batch).loss
    assert language_model_attention(model) == "eager"
    assert len(calls) >= lm.config.num_hidden_layers  # every LM layer ran the new kernel
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "attention", "reason"),
    [
        ("llava", "flash_attention_2", "FlashAttention2"),
        ("llava", "flex_attention", "CUDA GPUs"),
        ("paligemma2", "sdpa", "soft-capping"),  # Gemma 2 caps attention scores; sdpa cannot
    ],
)
def test_an_attention_kernel_that_cannot_run_is_a_one_line_config_error(
    family, attention, reason, family_dirs, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    adapter = load_adapter(family_dirs(family))
    with pytest.raises(ConfigError, match=rf"model\.speed\.attention: {attention} .*{reason}") as error:
        apply_speed(adapter, SpeedSpec(attention=attention))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"model\.speed"):
        parse_config({"model": {"pretrained": "x", "speed": {"attention": "flash"}}})


def test_an_adapter_moves_a_soft_capping_lm_off_sdpa(family_dirs):
    """transformers 5.17 lets Gemma 2 run sdpa, which drops its attention soft-capping."""
    from vlmkit.models.attention import language_model_attention

    adapter = load_adapter(family_dirs("paligemma2"))
    adapter.model.config.text_config._attn_implementation_internal = "sdpa"  # what 5.17 allows
    rebuilt = type(adapter)(adapter.model, adapter.processor, adapter.family)
    assert language_model_attention(rebuilt.model) == "eager"
    assert rebuilt.model.model.language_model.config._attn_implementation == "eager"
