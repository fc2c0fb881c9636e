"""One length rule for every adapter: a sample over `model.max_length` is refused, never cut,
with one message naming that key (vlmkit's VLM once named a `data.max_length` that does not exist)."""

import pytest

from tiny_models import image
from vlmkit.data.sample import Sample
from vlmkit.errors import SampleError
from vlmkit.models.adapters import load_adapter

pytest_plugins = ["tiny_families"]


@pytest.mark.parametrize("family", ["vlmkit_vlm", "paligemma", "qwen2_vl", "idefics3"])
def test_a_sample_over_max_length_is_refused_naming_model_max_length(family_dirs, tiny_vlm_dir, family):
    folder = tiny_vlm_dir if family == "vlmkit_vlm" else family_dirs(family)
    sample = Sample.vqa("long-one", image(0, (40, 32)), "what color " * 30 + "?", ["red"])
    fits = load_adapter(folder).encode([sample])
    length = int(fits["attention_mask"][0].sum())
    tight = load_adapter(folder, max_length=length - 1)
    with pytest.raises(SampleError) as info:
        tight.encode([sample])
    message = str(info.value)
    assert "long-one" in message and f"{length} tokens exceed max_length {length - 1}" in message
    assert "raise model.max_length" in message
    assert (
        load_adapter(folder, max_length=length).encode([sample])["input_ids"].shape == fits["input_ids"].shape
    )
