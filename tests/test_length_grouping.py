"""training.train_sampling_strategy: group_by_length with vlmkit's Sample datasets."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from conftest import tiny_config
from tiny_models import image
from vlmkit.config import parse_config
from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError
from vlmkit.models.adapters import load_adapter
from vlmkit.train.collate import SampleDataset
from vlmkit.train.trainer import VlmkitTrainer

pytest_plugins = ["tiny_families"]


@pytest.mark.parametrize("size", [(40, 32), (120, 64), (300, 200)])
def test_qwen2_vl_estimates_image_tokens_from_the_header_as_the_processor_counts_them(family_dirs, size):
    adapter = load_adapter(family_dirs("qwen2_vl"))
    sample = Sample.vqa("s", image(3, size), "what is it?", ["a shape"])
    ids = adapter.encode([sample], train=True)["input_ids"][0].tolist()
    image_token = adapter.model.config.image_token_id
    assert adapter.image_tokens_of(sample) == ids.count(image_token) > 0


def test_sample_lengths_follow_the_encoded_lengths(family_dirs):
    adapter = load_adapter(family_dirs("qwen2_vl"))
    samples = [
        Sample.vqa("a", image(0, (40, 32)), "what?", ["red"]),
        Sample.vqa("b", image(1, (300, 200)), "what is the colour of the largest bar in this chart?", ["a"]),
        Sample.vqa("c", image(2, (120, 64)), "how many?", ["a long answer with many words in it"]),
    ]
    estimates = adapter.sample_lengths(samples)
    exact = [int(adapter.encode([s], train=True)["attention_mask"].sum()) for s in samples]
    order = sorted(range(3), key=estimates.__getitem__)
    assert order == sorted(range(3), key=exact.__getitem__)
    offsets = [x - e for e, x in zip(estimates, exact, strict=True)]  # the template's own tokens
    assert max(offsets) - min(offsets) <= 4


def test_group_by_length_uses_the_adapters_lengths(tiny_vlm_dir, easyvqa_samples, tmp_path):
    adapter = load_adapter(tiny_vlm_dir)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        train_sampling_strategy="group_by_length",
        use_cpu=True,
        report_to="none",
    )
    samples = easyvqa_samples[:40]
    trainer = VlmkitTrainer(
        model=adapter.model,
        args=args,
        train_dataset=SampleDataset(samples),
        sample_lengths=adapter.sample_lengths,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == adapter.sample_lengths(samples)
    assert sorted(sampler) == list(range(40))  # every sample once


def test_a_run_trains_with_group_by_length(tmp_path):
    from vlmkit.train.runner import train

    raw = tiny_config(
        tmp_path,
        **{"training.train_sampling_strategy": "group_by_length", "training.save_strategy": "no"},
    )
    result = train(parse_config(raw))
    assert (result.model_dir / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"training.train_sampling_strategy": "batch_rebalance"}, "batch_rebalance is not supported"),
        (
            {"training.train_sampling_strategy": "group_by_length", "data.questions_per_image": 4},
            "keep one",
        ),
    ],
)
def test_sampling_choices_that_cannot_work_are_config_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_config(tmp_path, **changes))
