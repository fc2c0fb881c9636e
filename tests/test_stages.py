"""Resampler projector, staged training with freezing, and the LLaVA conversation source."""

import json

import pytest
import torch
from PIL import Image

from conftest import tiny_config
from vlmkit.config import parse_config
from vlmkit.data.sources import load_samples
from vlmkit.errors import DataError
from vlmkit.models.adapters import load_adapter
from vlmkit.models.projectors import ResamplerProjector
from vlmkit.train.runner import train


@pytest.mark.parametrize(("tokens", "queries"), [(17, 4), (257, 196), (3, 9)])
def test_resampler_emits_one_token_per_query(tokens, queries):
    projector = ResamplerProjector(vision_dim=24, text_dim=32, num_queries=queries)
    out = projector(torch.randn(2, tokens, 24))
    assert out.shape == (2, queries, 32)
    assert projector.num_tokens(tokens) == queries
    out.sum().backward()
    assert projector.queries.grad is not None and projector.queries.grad.abs().sum() > 0


def llava_records(tmp_path, records):
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(records))
    return {"source": "llava_json", "path": str(path)}


GOOD = {
    "id": "conv-1",
    "image": "blue.png",
    "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"},
        {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "is it red?"},
        {"from": "gpt", "value": "no"},
    ],
}


def test_llava_json_becomes_a_multi_turn_sample(tmp_path):
    sample = load_samples(llava_records(tmp_path, [GOOD]))[0]
    assert [m["role"] for m in sample.messages] == ["user", "assistant", "user", "assistant"]
    assert sample.messages[0]["content"] == "what color is the shape?"
    assert sample.answers == ["no"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": "missing.png"}, "missing.png does not exist"),
        (
            {"conversations": [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "x"}]},
            "no <image> marker",
        ),
        (
            {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image> q"}]},
            "must alternate",
        ),
        (
            {"conversations": [{"from": "human", "value": "<image> q"}, {"from": "human", "value": "again"}]},
            "must alternate",
        ),
    ],
)
def test_llava_json_errors_name_the_record(tmp_path, change, message):
    with pytest.raises(DataError, match=message) as error:
        load_samples(llava_records(tmp_path, [{**GOOD, "id": "rec-42", **change}]))
    assert "'rec-42'" in str(error.value)


def test_two_stages_freeze_what_they_say_and_chain(tmp_path):
    zebra = {**GOOD, "conversations": [GOOD["conversations"][0], {"from": "gpt", "value": "zebra"}]}
    data = llava_records(tmp_path, [{**GOOD, "id": f"c{i}"} for i in range(7)] + [{**zebra, "id": "z"}])
    stages = [
        {
            "name": "align",
            "freeze": {"lm": True},
            "data": {"train": {"source": "easyvqa", "split": "train", "limit": 16}},
        },
        {"name": "instruct", "freeze": {"vision": True}, "data": {"train": data}},
    ]
    raw = tiny_config(
        tmp_path,
        **{
            "model.init.projector": "resampler",
            "model.init.projector_kwargs": {"num_queries": 3},
            "training.per_device_train_batch_size": 4,
            "training.learning_rate": 1e-2,
            "training.save_strategy": "no",
            "stages": stages,
        },
    )
    result = train(parse_config(raw))
    run = result.run_dir
    align = json.loads((run / "1-align" / "trainable.json").read_text())
    instruct = json.loads((run / "2-instruct" / "trainable.json").read_text())
    assert not any(n.startswith("language_model.") for n in align["trainable"])
    assert any(n.startswith("vision_tower.") for n in align["trainable"])
    assert not any(n.startswith("vision_tower.") for n in instruct["trainable"])
    assert any(n.startswith("language_model.") for n in instruct["trainable"])
    assert align["trainable_parameters"] < align["total_parameters"]
    stage1 = load_adapter(run / "1-align" / "model").model.state_dict()
    final = load_adapter(run / "model").model.state_dict()
    lm_key = next(k for k in stage1 if k.startswith("language_model.") and k.endswith("q_proj.weight"))
    vision_key = next(k for k in stage1 if k.startswith("vision_tower.") and k.endswith("convolution.weight"))
    assert torch.equal(stage1[vision_key], final[vision_key])  # frozen in stage 2, carried from stage 1
    stats_key = next(k for k in stage1 if k.startswith("vision_tower.") and k.endswith("running_mean"))
    assert torch.equal(stage1[stats_key], final[stats_key])  # a frozen tower runs in eval mode
    tokenizer = load_adapter(run / "model").tokenizer
    assert tokenizer.convert_tokens_to_ids("zebra") != tokenizer.unk_token_id  # stage 2's words too
    assert not torch.equal(stage1[lm_key], final[lm_key])  # trained in stage 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == ["align", "instruct"]
