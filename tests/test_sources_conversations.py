"""Conversation data as published: LLaVA 665k (text-only rows, several images), SVIT, and the
`datasets` layouts of TRL and the_cauldron."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmkit.data.sample import text_of
from vlmkit.data.sources import load_samples
from vlmkit.errors import DataError


def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return str(path)


def picture(path, color=(0, 0, 255)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


# -- LLaVA 665k -----------------------------------------------------------------------------------
def test_llava_665k_mix_keeps_text_only_sharegpt_rows(tmp_path):
    picture(tmp_path / "coco" / "train2017" / "000000033471.jpg")
    records = [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                {"from": "gpt", "value": "White and red."},
            ],
        },
        {
            "id": "i6IyJda_0",  # a ShareGPT row: no image field at all
            "model": "",
            "conversations": [
                {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
                {"from": "gpt", "value": "Check homogeneity, distinctness and size."},
            ],
        },
    ]
    samples = load_samples({"source": "llava_json", "path": write_json(tmp_path / "665k.json", records)})
    assert [s.image is None for s in samples] == [False, True]
    assert samples[1].images == [] and samples[1].answers == ["Check homogeneity, distinctness and size."]
    assert samples[0].messages[0]["content"] == "What are the colors of the bus?"


def test_a_text_only_record_with_an_image_marker_is_refused(tmp_path):
    records = [
        {
            "id": "t",
            "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}],
        }
    ]
    with pytest.raises(DataError, match="marker but no image") as error:
        load_samples({"source": "llava_json", "path": write_json(tmp_path / "a.json", records)})
    assert "record 0" in str(error.value) and "'t'" in str(error.value)


def test_several_images_become_image_parts_in_marker_order(tmp_path):
    picture(tmp_path / "a.png", (255, 0, 0))
    picture(tmp_path / "b.png", (0, 255, 0))
    record = {
        "id": "two",
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich is greener?"},
            {"from": "gpt", "value": "The second."},
        ],
    }
    [sample] = load_samples({"source": "llava_json", "path": write_json(tmp_path / "m.json", [record])})
    assert [str(p) for p in sample.images] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert sample.messages[0]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "Which is greener?"},
    ]
    assert text_of(sample.messages[1]) == "The second."
    bad = {
        **record,
        "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}],
    }
    with pytest.raises(DataError, match="2 images but 1 <image> marker"):
        load_samples({"source": "llava_json", "path": write_json(tmp_path / "bad.json", [bad])})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"id": "x", "conversations": []}, "holds a JSON object .keys: id, conversations., not a list"),
        ({"data": [{"id": "x"}], "version": 1}, "records look to be under 'data'"),
        ("just text", "holds a JSON str"),
        (["not a record"], "record 0 is str, not an object"),
    ],
)
def test_llava_files_of_the_wrong_shape_are_one_line_errors(tmp_path, content, message):
    path = write_json(tmp_path / "odd.json", content)
    with pytest.raises(DataError, match=message) as error:
        load_samples({"source": "llava_json", "path": path})
    assert "odd.json" in str(error.value) and "\n" not in str(error.value)


def test_llava_folder_reads_the_split_file(tmp_path):
    picture(tmp_path / "blue.png")
    turn = [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]
    write_json(tmp_path / "test.json", [{"id": "t1", "image": "blue.png", "conversations": turn}])
    write_json(tmp_path / "train.json", [{"id": "r1", "image": "blue.png", "conversations": turn}])
    assert [s.id for s in load_samples({"source": "llava_json", "split": "test", "path": str(tmp_path)})] == [
        "t1"
    ]
    with pytest.raises(DataError, match=r"no validation\.json or validation\.jsonl"):
        load_samples({"source": "llava_json", "split": "validation", "path": str(tmp_path)})


# -- SVIT -----------------------------------------------------------------------------------------
def test_svit_as_published_resolves_image_ids_and_nested_groups(tmp_path):
    picture(tmp_path / "VG" / "VG_100K" / "2345.jpg", (255, 0, 0))
    picture(tmp_path / "VG" / "VG_100K_2" / "2400001.jpg", (0, 255, 0))
    records = [
        {
            "image_id": 2345,
            "conversations": [
                {
                    "content": [
                        {"from": "user", "value": "What is on the table?"},
                        {"from": "gpt", "value": "A red plate."},
                    ]
                },
                {
                    "content": [
                        {"from": "user", "value": "What color is the plate?"},
                        {"from": "gpt", "value": "Red."},
                        {"from": "user", "value": "Is it empty?"},
                        {"from": "gpt", "value": "Yes."},
                    ]
                },
            ],
        },
        {
            "image_id": "2400001",
            "conversations": [
                {"from": "user", "value": "Describe the image."},
                {"from": "gpt", "value": "A green field."},
            ],
        },
    ]
    path = write_json(tmp_path / "svit" / "conversation.json", records)
    samples = load_samples(
        {"source": "llava_json", "path": path, "options": {"image_folder": str(tmp_path / "VG")}}
    )
    assert [s.id for s in samples] == ["2345-0", "2345-1", "2400001"]
    assert samples[0].image == str(tmp_path / "VG" / "VG_100K" / "2345.jpg")
    assert samples[2].image == str(tmp_path / "VG" / "VG_100K_2" / "2400001.jpg")
    assert [m["role"] for m in samples[1].messages] == ["user", "assistant"] * 2
    assert samples[1].answers == ["Yes."]

    missing = [{"image_id": 99, "conversations": records[1]["conversations"]}]
    with pytest.raises(DataError, match=r"no image named 99\.jpg under .*set image_folder"):
        load_samples(
            {
                "source": "llava_json",
                "path": write_json(tmp_path / "m.json", missing),
                "options": {"image_folder": str(tmp_path / "VG")},
            }
        )


def test_a_single_file_source_without_a_split_is_named_after_its_file(tmp_path):
    from vlmkit.data.sources import DataSpec

    path = write_json(tmp_path / "test.json", [])
    assert str(DataSpec(source="llava_json", path=path)) == "llava_json:test"
    assert str(DataSpec(source="llava_json", path=path, split="validation")) == "llava_json:validation"
    assert str(DataSpec.model_validate("easyvqa:test")) == "easyvqa:test"


# -- TRL and the_cauldron layouts -----------------------------------------------------------------
def _png(color):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_trl(folder, layout):
    import datasets

    part = {
        "index": datasets.Value("int64"),
        "text": datasets.Value("string"),
        "type": datasets.Value("string"),
    }
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "messages": [{"content": [part], "role": datasets.Value("string")}],
        }
    )
    image, text = (
        {"index": 0, "text": None, "type": "image"},
        lambda t: {"index": None, "text": t, "type": "text"},
    )
    rows = {
        "images": [[_png((255, 0, 0))], [], [_png((0, 255, 0)), _png((0, 0, 255))]],
        "messages": [
            [
                {"role": "user", "content": [image, text("What color?")]},
                {"role": "assistant", "content": [text("Red.")]},
            ],
            [{"role": "user", "content": [text("Say hi.")]}, {"role": "assistant", "content": [text("Hi.")]}],
            [
                {"role": "user", "content": [image, image, text("Compare.")]},
                {"role": "assistant", "content": [text("Green, then blue.")]},
            ],
        ],
    }
    table = datasets.Dataset.from_dict(rows, features=features)
    if layout == "parquet":
        (folder / "data").mkdir(parents=True)
        table.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    else:
        datasets.DatasetDict({"train": table}).save_to_disk(str(folder))
    return str(folder)


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_trl_messages_layout(tmp_path, layout):
    import numpy as np

    from vlmkit.data.images import load_image

    samples = load_samples({"source": "hf_conversations", "path": write_trl(tmp_path / "trl", layout)})
    assert [len(s.images) for s in samples] == [1, 0, 2]
    assert samples[1].image is None and samples[1].messages[0]["content"] == [
        {"type": "text", "text": "Say hi."}
    ]
    assert samples[0].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What color?"}]
    assert samples[2].answers == ["Green, then blue."]
    assert np.asarray(load_image(samples[2].images[1]))[0, 0].tolist() == [0, 0, 255]


def test_the_cauldron_texts_layout(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "texts": [
                {
                    "user": datasets.Value("string"),
                    "assistant": datasets.Value("string"),
                    "source": datasets.Value("string"),
                }
            ],
        }
    )
    rows = {
        "images": [[_png((1, 2, 3))]],
        "texts": [
            [
                {"user": "Question: what?\nAnswer:", "assistant": "A chart.", "source": "ChartQA"},
                {"user": "How many bars?", "assistant": "3", "source": "ChartQA"},
            ]
        ],
    }
    (tmp_path / "chartqa").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(tmp_path / "chartqa" / "train-00000-of-00001.parquet")
    )
    [sample] = load_samples({"source": "hf_conversations", "path": str(tmp_path / "chartqa")})
    assert [m["role"] for m in sample.messages] == ["user", "assistant"] * 2
    assert sample.answers == ["3"] and len(sample.images) == 1 and sample.meta == {"source": "ChartQA"}


def test_hf_conversations_without_a_conversation_column_is_one_line(tmp_path):
    from vqa_fixtures import write_docvqa

    write_docvqa(tmp_path / "doc")
    with pytest.raises(DataError, match=r"neither a messages \(TRL\) nor a texts"):
        load_samples({"source": "hf_conversations", "path": str(tmp_path / "doc")})
