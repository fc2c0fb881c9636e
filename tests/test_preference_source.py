"""The `preference` source: JSONL, LLaVA-style JSON and `datasets` layouts (RLAIF-V, TRL) -> pairs."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmkit.data.sources import load_samples
from vlmkit.errors import DataError


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_llava_style_json_drops_the_marker_and_the_last_gpt_turn(tmp_path, picture):
    record = {
        "id": "r1",
        "image": picture.name,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "old"},
        ],
        "chosen": "red",
        "rejected": "blue",
    }
    (tmp_path / "train.json").write_text(json.dumps([record]))
    [sample] = load_samples({"source": "preference", "path": str(tmp_path)})
    assert sample.messages == [
        {"role": "user", "content": "What colour?"},
        {"role": "assistant", "content": "red"},
    ]
    assert sample.meta["rejected"] == "blue" and sample.image == str(picture.resolve())


def test_rlaif_v_columns_from_a_saved_dataset(tmp_path, picture):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict(
        {
            "image": [Image.open(picture)],
            "question": ["What colour is it?"],
            "chosen": ["It is red."],
            "rejected": ["It is blue."],
            "origin_dataset": ["x"],
        }
    ).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "rlaif"))
    [sample] = load_samples({"source": "preference", "path": str(tmp_path / "rlaif")})
    assert sample.question == "What colour is it?" and sample.messages[-1]["content"] == "It is red."
    assert sample.meta["rejected"] == "It is blue."
    assert sample.images[0].read() is not None


def test_trl_vision_layout_with_conversational_columns(tmp_path, picture):
    datasets = pytest.importorskip("datasets")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    table = datasets.Dataset.from_dict(
        {
            "images": [[Image.open(picture)]],
            "prompt": [prompt],
            "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]],
            "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]],
        }
    )
    table.to_parquet(str(tmp_path / "train-00000.parquet"))
    [sample] = load_samples({"source": "preference", "path": str(tmp_path)})
    assert sample.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    assert sample.messages[-1] == {"role": "assistant", "content": "red"}
    assert sample.meta["rejected"] == "blue" and len(sample.images) == 1


def test_a_record_without_a_prompt_is_named(tmp_path, picture):
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"id": "z", "image": picture.name, "chosen": "a", "rejected": "b"})
    )
    with pytest.raises(DataError, match=r"p.jsonl:1 \(id 'z'\): no prompt"):
        load_samples({"source": "preference", "path": str(tmp_path / "p.jsonl")})
