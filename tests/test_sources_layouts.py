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


# -- Hugging Face layouts -------------------------------------------------------------------------
def test_single_split_save_to_disk_is_read_only_under_its_own_name(tmp_path):
    import datasets

    from vqa_fixtures import write_docvqa

    write_docvqa(tmp_path / "parquet", split="validation", n=3)
    table = datasets.load_dataset(
        "parquet",
        data_files={"validation": str(tmp_path / "parquet" / "data" / "*.parquet")},
        split="validation",
    )
    table.save_to_disk(str(tmp_path / "val-only"))
    spec = {"source": "docvqa", "path": str(tmp_path / "val-only")}
    assert len(load_samples({**spec, "split": "validation"})) == 3
    with pytest.raises(DataError, match="save_to_disk folder of the 'validation' split only, not 'train'"):
        load_samples({**spec, "split": "train"})


def test_hub_refs_convert_parquet_layout_from_its_root(tmp_path):
    from vqa_fixtures import write_chartqa

    write_chartqa(tmp_path / "flat", split="test", n=4)
    target = tmp_path / "converted" / "default" / "test"
    target.mkdir(parents=True)
    (tmp_path / "flat" / "data" / "test-00000-of-00001.parquet").rename(target / "0000.parquet")
    assert len(load_samples({"source": "chartqa", "split": "test", "path": str(tmp_path / "converted")})) == 4


def test_lmms_lab_docvqa_root_reads_docvqa_beside_infographicvqa(tmp_path):
    from vqa_fixtures import write_chartqa, write_docvqa

    write_docvqa(tmp_path / "tmp-doc", split="validation", n=3)
    write_chartqa(tmp_path / "tmp-info", split="validation", n=5)  # other columns, as InfographicVQA's
    for name, tmp in (("DocVQA", "tmp-doc"), ("InfographicVQA", "tmp-info")):
        (tmp_path / "lmms" / name).mkdir(parents=True)
        (tmp_path / tmp / "data" / "validation-00000-of-00001.parquet").rename(
            tmp_path / "lmms" / name / "validation-00000-of-00001.parquet"
        )
    samples = load_samples({"source": "docvqa", "split": "validation", "path": str(tmp_path / "lmms")})
    assert len(samples) == 3 and samples[0].answers == ["title 0", "Title 0"]
    with pytest.raises(DataError, match=r"several subsets side by side \(DocVQA, InfographicVQA\)"):
        load_samples({"source": "chartqa", "split": "validation", "path": str(tmp_path / "lmms")})


def test_chartqa_github_release_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "ChartQA Dataset"
    (root / "val" / "png").mkdir(parents=True)
    for name in ("41699051005347.png", "multi_col_1.png"):
        Image.new("RGB", (20, 10), (9, 9, 9)).save(root / "val" / "png" / name)
    human = [{"imgname": "41699051005347.png", "query": "What is the peak value?", "label": "42"}]
    augmented = [{"imgname": "multi_col_1.png", "query": "How many bars?", "label": "3"}] * 2
    (root / "val" / "val_human.json").write_text(json.dumps(human))
    (root / "val" / "val_augmented.json").write_text(json.dumps(augmented))
    spec = {"source": "chartqa", "split": "validation", "path": str(root)}
    samples = load_samples(spec)
    assert [s.meta["human_or_machine"] for s in samples] == ["human", "augmented", "augmented"]
    assert samples[0].answers == ["42"] and samples[0].image == str(
        root / "val" / "png" / "41699051005347.png"
    )
    assert len(load_samples({**spec, "options": {"subset": "human"}})) == 1
    with pytest.raises(DataError, match=r"no 'train' split .*\(it holds val/\); the layouts read are"):
        load_samples({**spec, "split": "train"})


def test_an_oversized_image_names_its_file(tmp_path, monkeypatch):
    from PIL import Image

    from vlmkit.data.images import image_size, load_image

    Image.new("RGB", (40, 40)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x 100: as 15000 x 15000 is
    with pytest.raises(DataError, match=r"huge\.png has 1600 pixels, over PIL's limit .* downscale it"):
        load_image(tmp_path / "huge.png")
    assert image_size(str(tmp_path / "huge.png")) is None
