import json

import pytest

from vlmkit.data.sources import DataSpec, load_samples
from vlmkit.data.sources.easyvqa import question_type
from vlmkit.errors import DataError


def test_easyvqa_splits_have_the_published_sizes():
    train = load_samples("easyvqa:train")
    test = load_samples("easyvqa:test")
    assert (len(train), len(test)) == (38575, 9673)
    assert len({s.image for s in train}) == 4000
    assert len({s.image for s in test}) == 1000
    answers = {a for s in train + test for a in s.answers}
    assert len(answers) == 13


def test_easyvqa_sample_shape():
    sample = load_samples({"source": "easyvqa", "split": "test", "limit": 1})[0]
    assert [m["role"] for m in sample.messages] == ["user", "assistant"]
    assert sample.messages[1]["content"] == sample.answers[0]
    assert sample.meta["question_type"] in {"shape", "color", "yes/no", "yes/no (negated)"}


def test_question_types():
    assert question_type("is there not a red shape?", "yes") == "yes/no (negated)"
    assert question_type("is no circle present?", "no") == "yes/no (negated)"
    assert question_type("is there a red shape?", "no") == "yes/no"
    assert question_type("what shape is present?", "circle") == "shape"


def test_seeded_count_subsample_is_reproducible():
    a = load_samples({"source": "easyvqa", "split": "test", "count": 50, "seed": 3})
    b = load_samples({"source": "easyvqa", "split": "test", "count": 50, "seed": 3})
    c = load_samples({"source": "easyvqa", "split": "test", "count": 50, "seed": 4})
    assert [s.id for s in a] == [s.id for s in b] != [s.id for s in c]
    assert len(load_samples({"source": "easyvqa", "split": "test", "fraction": 0.1})) == 967


def test_unknown_source_names_the_choices():
    with pytest.raises(DataError, match=r"unknown data source .nope.*easyvqa"):
        load_samples("nope:train")


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_samples({"source": "jsonl", "path": str(tmp_path)})


def test_jsonl_source(tmp_path):
    lines = [
        {"id": "a", "image": "a.png", "question": "q?", "answers": ["x", "y"]},
        {
            "id": "b",
            "image": "b.png",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        },
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    samples = load_samples(DataSpec(source="jsonl", path=str(tmp_path)))
    assert samples[0].answers == ["x", "y"] and samples[0].image == str(tmp_path / "a.png")
    assert samples[1].answers == ["yo"]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        '{"id": "a", "image": "a.png", "question": "q", "answer": "x"}\n{oops\n'
    )
    with pytest.raises(DataError, match=r"train.jsonl:2 is not valid JSON"):
        load_samples({"source": "jsonl", "path": str(tmp_path)})


def test_each_source_has_eval_defaults():
    from vlmkit.data.sources import eval_defaults

    assert eval_defaults("vqav2") == {
        "metric": "vqa_accuracy",
        "prompt_suffix": " Answer the question using a single word or phrase.",
        "max_new_tokens": 16,
    }
    assert eval_defaults("docvqa")["metric"] == "anls"
    assert eval_defaults("chartqa")["metric"] == "relaxed_accuracy"
    assert eval_defaults("easyvqa") == {"metric": "exact_match", "prompt_suffix": "", "max_new_tokens": 3}


def test_where_keeps_only_matching_metadata():
    spec = {"source": "easyvqa", "split": "test", "where": {"question_type": ["shape", "color"]}}
    kept = load_samples(spec)
    everything = load_samples("easyvqa:test")
    expected = [s.id for s in everything if s.meta["question_type"] in ("shape", "color")]
    assert [s.id for s in kept] == expected
    assert 0 < len(kept) < len(everything)
    assert {s.meta["question_type"] for s in kept} == {"shape", "color"}


def test_where_matching_nothing_names_the_values_present():
    with pytest.raises(DataError, match=r"no sample of easyvqa:test matches.*'shape'"):
        load_samples({"source": "easyvqa", "split": "test", "where": {"question_type": ["colour"]}})
