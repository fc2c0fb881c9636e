from collections import Counter

import pytest

from vlmkit.data.conversations import INDEPENDENT_TURNS, merge_turns
from vlmkit.data.sample import Sample
from vlmkit.data.sources import load_samples

pytest_plugins = ["tiny_families"]


def _turns(sample: Sample) -> list[tuple[str, str]]:
    messages = sample.messages
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def test_every_question_lands_in_exactly_one_conversation_about_its_image():
    singles = load_samples({"source": "easyvqa", "split": "test", "limit": 400})
    merged = merge_turns(singles, turns=4, seed=0)
    assert len(merged) < len(singles)
    expected = Counter((s.image, s.question, s.answers[0]) for s in singles)
    found = Counter((m.image, q, a) for m in merged for q, a in _turns(m))
    assert found == expected  # nothing dropped, nothing repeated, no question moved to another image
    for conversation in merged:
        assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * (
            len(conversation.messages) // 2
        )
        assert conversation.answers == [conversation.messages[-1]["content"]]


def test_an_images_questions_split_into_near_equal_chunks():
    singles = [Sample.vqa(f"q{i}", "a.png", f"question {i}?", [f"answer {i}"]) for i in range(11)]
    merged = merge_turns(singles, turns=5, seed=0)
    assert sorted(len(m.messages) // 2 for m in merged) == [3, 4, 4]
    assert sorted(m.meta["turns"] for m in merged) == [3, 4, 4]


def test_the_order_within_an_image_follows_the_seed():
    singles = load_samples({"source": "easyvqa", "split": "test", "limit": 200})
    first = [m.id for m in merge_turns(singles, turns=3, seed=0)]
    assert first == [m.id for m in merge_turns(singles, turns=3, seed=0)]
    assert first != [m.id for m in merge_turns(singles, turns=3, seed=1)]


def test_metadata_kept_only_where_every_turn_agrees():
    singles = [
        Sample.vqa("a", "x.png", "what shape?", ["circle"], image_id=7, question_type="shape"),
        Sample.vqa("b", "x.png", "what color?", ["red"], image_id=7, question_type="color"),
    ]
    (merged,) = merge_turns(singles, turns=2)
    assert merged.meta == {"image_id": 7, "turns": 2, INDEPENDENT_TURNS: True}
    assert set(merged.id.split("+")) == {"a", "b"}


def test_samples_that_are_not_one_question_about_an_image_file_pass_through():
    conversation = Sample(
        "c",
        "x.png",
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "b"},
        ],
    )
    text_only = Sample.vqa("t", None, "2+2?", ["4"])
    single = Sample.vqa("s", "x.png", "what shape?", ["circle"])
    merged = merge_turns([conversation, text_only, single], turns=4)
    assert merged == [conversation, text_only, single]


def test_turns_per_image_in_a_data_spec_merges_after_filtering():
    spec = {"source": "easyvqa", "split": "test", "where": {"question_type": ["shape", "color"]}}
    singles = load_samples(spec)
    merged = load_samples({**spec, "turns_per_image": 8})
    assert len(merged) == len({s.image for s in singles})  # at most a shape and a colour question or two each
    assert sum(len(m.messages) // 2 for m in merged) == len(singles)
    with pytest.raises(ValueError):
        merge_turns(singles, turns=0)


def test_merged_turns_are_refused_where_they_would_not_all_be_trained_or_scored(tmp_path, family_dirs):
    from conftest import tiny_config
    from vlmkit.config import parse_config
    from vlmkit.errors import ConfigError
    from vlmkit.train.runner import train

    merged = {"source": "easyvqa", "split": "test", "limit": 40, "turns_per_image": 3}
    with pytest.raises(ConfigError, match="evaluation asks one question per sample"):
        parse_config(tiny_config(tmp_path, **{"data.eval": merged}))
    # PaliGemma trains the first question of a conversation only: merged rows would lose the rest.
    raw = tiny_config(tmp_path, **{"data.train": merged})
    raw["model"] = {"pretrained": str(family_dirs("paligemma"))}
    with pytest.raises(ConfigError, match=r"turns_per_image .* not for paligemma models"):
        train(parse_config(raw))
