"""Published layouts and their malformed variants: each problem is one line naming the file and fix."""

from __future__ import annotations

import json

import pytest

from vlmkit.data.sources import data_spec, load_samples, parse_options
from vlmkit.errors import DataError
from vqa_fixtures import write_vqav2_original


# -- source options are checked at config load --------------------------------------------------
def test_an_unknown_source_option_lists_the_valid_ones():
    with pytest.raises(
        DataError, match="vqav2 takes no option 'image_dir'; its options are: system, image_folder"
    ):
        data_spec({"source": "vqav2", "options": {"image_dir": "x"}})
    with pytest.raises(DataError, match=r"data\.path and data\.split are fields"):
        data_spec({"source": "llava_json", "options": {"path": "x"}})
    assert data_spec("chartqa:test", options={"subset": "human"}).options == {"subset": "human"}


def test_run_config_refuses_an_unknown_option_in_one_line(tmp_path):
    from vlmkit.config import DataSection, validate
    from vlmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="docvqa takes no option 'image_folder'; its options are: system"):
        validate(
            DataSection, {"train": {"source": "docvqa", "options": {"image_folder": "x"}}}, "run.yaml", "docs"
        )


def test_cli_data_options_parse_json_values_and_keep_text():
    assert parse_options(["image_folder=/data/coco", "check_images=false", "subset=no"]) == {
        "image_folder": "/data/coco",
        "check_images": False,
        "subset": "no",
    }
    with pytest.raises(DataError, match="not KEY=VALUE"):
        parse_options(["image_folder"])


# -- VQAv2 original layout ------------------------------------------------------------------------
def test_vqav2_images_from_a_separate_coco_folder(tmp_path):
    write_vqav2_original(tmp_path / "coco")  # writes coco/val2014/ images and the JSON beside them
    (tmp_path / "vqa").mkdir()
    for file in (tmp_path / "coco").glob("*.json"):
        file.rename(tmp_path / "vqa" / file.name)
    spec = {"source": "vqav2", "split": "validation", "path": str(tmp_path / "vqa")}
    samples = load_samples({**spec, "options": {"image_folder": str(tmp_path / "coco")}})
    assert samples[0].image == str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000007.jpg")
    also = load_samples({**spec, "options": {"image_folder": str(tmp_path / "coco" / "val2014")}})
    assert also[0].image == samples[0].image  # the split's folder itself works too
    with pytest.raises(DataError, match=r"image_folder .* is not a folder"):
        load_samples({**spec, "options": {"image_folder": str(tmp_path / "nowhere")}})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            [{"question_id": 1, "image_id": 1, "question": "q"}],
            r"is a JSON list; the official VQAv2 file is an object",
        ),
        ({"info": {}, "data": []}, r"object with keys info, data; the official .* \"questions\" list"),
        ({"questions": ["q"]}, r"questions\[0\] is not an object"),
        ({"questions": [{"question_id": 5, "image_id": 1}]}, r"question 0 \(id 5\) lacks question"),
    ],
)
def test_vqav2_malformed_questions_are_one_line(tmp_path, content, message):
    write_vqav2_original(tmp_path)
    file = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    file.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message) as error:
        load_samples({"source": "vqav2", "split": "validation", "path": str(tmp_path)})
    assert str(file) in str(error.value) and "\n" not in str(error.value)


# -- the CLI reaches local data and passes options -------------------------------------------------
def test_to_shards_takes_data_path_and_options(tmp_path, monkeypatch, capsys):
    from test_cli import run_cli
    from vlmkit.data.shards import iter_shards

    write_vqav2_original(tmp_path / "coco")
    (tmp_path / "vqa").mkdir()
    for file in (tmp_path / "coco").glob("*.json"):
        file.rename(tmp_path / "vqa" / file.name)
    args = ["data", "to-shards", "--data", "vqav2:validation", "--out", str(tmp_path / "shards")]
    args += ["--data-path", str(tmp_path / "vqa")]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--data-option", f"image_folder={tmp_path / 'coco'}")
    assert code == 0, err
    assert len(list(iter_shards(str(tmp_path / "shards")))) == 4
    code, _, err = run_cli(monkeypatch, capsys, *args, "--data-option", "image_dir=x")
    assert code == 2 and "vqav2 takes no option 'image_dir'" in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_a_bad_data_option_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    args = ["eval", "--model", str(tmp_path / "no-model"), "--data", "docvqa:test"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--data-option", "subset=human")
    assert code == 2 and "docvqa takes no option 'subset'; its options are: system" in err
