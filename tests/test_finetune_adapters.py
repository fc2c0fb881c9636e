"""PaliGemma / Qwen2-VL / Qwen2.5-VL / LLaVA adapters on tiny random models saved to temp folders."""

import pytest
import torch

from tiny_models import build_qwen2_vl, image
from vlmkit.data.sample import Sample
from vlmkit.errors import ConfigError, SampleError
from vlmkit.models.adapters import load_adapter
from vlmkit.models.chat_encoding import IGNORE_INDEX

pytest_plugins = ["tiny_families"]

FAMILIES = ["paligemma", "paligemma2", "qwen2_vl", "qwen2_5_vl", "llava"]
END_TOKEN = {
    "paligemma": "<eos>",
    "paligemma2": "<eos>",
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "llava": "</s>",
}
QUESTIONS = [("what color is the shape?", "red"), ("How many bars are in the chart?", "42 million")]


def samples():
    # Different image sizes: Qwen2-VL gives them different numbers of vision tokens.
    return [
        Sample.vqa("a", image(0, (40, 32)), *QUESTIONS[0][:1], [QUESTIONS[0][1]]),
        Sample.vqa("b", image(1, (64, 48)), *QUESTIONS[1][:1], [QUESTIONS[1][1]]),
    ]


@pytest.fixture(scope="module")
def adapters(family_dirs):
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_adapter(family_dirs(name))
        return loaded[name]

    return get


def unlabelled_ids(adapter):
    config = adapter.model.config
    ids = {getattr(config, "image_token_id", None), getattr(config, "image_token_index", None)}
    ids |= {getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)}
    return {i for i in ids if i is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_the_answer_and_end_token(adapters, family):
    adapter = adapters(family)
    batch = adapter.encode(samples(), train=True)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert labels.shape == ids.shape
    for row, (_, answer) in enumerate(QUESTIONS):
        labelled = labels[row][labels[row] != IGNORE_INDEX]
        assert adapter.tokenizer.decode(labelled) == answer + END_TOKEN[family]
        positions = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(labels[row][positions], ids[row][positions])
        assert positions.tolist() == list(
            range(int(positions[0]), int(positions[-1]) + 1)
        )  # one contiguous turn
    assert (labels[mask == 0] == IGNORE_INDEX).all()  # padding never labelled
    for token in unlabelled_ids(adapter):
        assert (labels[ids == token] == IGNORE_INDEX).all()
    assert mask[0].sum() != mask[1].sum() and (mask[:, 0] == 1).all()  # right padding in training
    loss = adapter.model(**batch).loss
    assert torch.isfinite(loss)


def two_question_chat() -> Sample:
    return Sample(
        id="chat",
        image=image(2),
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "what color is the shape?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "How many bars?"},
            {"role": "assistant", "content": "42"},
        ],
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_multi_turn_labels_cover_every_assistant_turn_only(adapters, family):
    adapter = adapters(family)
    labels = adapter.encode([two_question_chat()])["labels"][0].tolist()
    turns, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            turns.append(adapter.tokenizer.decode(current).strip())
            current = []
    assert turns == [f"red{END_TOKEN[family]}", f"42{END_TOKEN[family]}"]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_returns_strings_with_left_padding(adapters, family):
    adapter = adapters(family)
    batch = adapter.encode(samples(), train=False)
    assert "labels" not in batch
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding for generation
    answers = adapter.generate(samples(), max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("family", ["paligemma2", "qwen2_vl", "llava"])
def test_batched_generation_matches_one_by_one(adapters, family):
    adapter = adapters(family)
    together = adapter.generate(samples(), max_new_tokens=4)
    alone = [adapter.generate([s], max_new_tokens=4)[0] for s in samples()]
    assert together == alone


def test_paligemma_matches_the_processor(adapters, family_dirs):
    from transformers import AutoProcessor

    adapter = adapters("paligemma")
    processor = AutoProcessor.from_pretrained(family_dirs("paligemma"))
    question, answer = QUESTIONS[0]
    reference = processor(text=f"<image>answer en {question}", images=image(0, (40, 32)), suffix=answer)
    batch = adapter.encode(samples()[:1], train=True)
    assert batch["input_ids"][0].tolist() == list(reference["input_ids"][0])
    assert batch["token_type_ids"][0].tolist() == list(reference["token_type_ids"][0])
    assert batch["labels"][0].tolist() == list(reference["labels"][0])
    assert torch.allclose(batch["pixel_values"][0], torch.as_tensor(reference["pixel_values"][0]))


def test_paligemma_token_types(adapters):
    adapter = adapters("paligemma")
    train = adapter.encode(samples(), train=True)
    suffix = train["token_type_ids"] == 1
    assert torch.equal(suffix, train["labels"] != IGNORE_INDEX)  # suffix (answer + EOS) is exactly the labels
    generation = adapter.encode(samples(), train=False)
    assert (generation["token_type_ids"] == 0).all()  # the whole prompt is the bidirectional prefix


def test_paligemma_prompt_prefix_option(family_dirs):
    adapter = load_adapter(family_dirs("paligemma"), prompt_prefix="caption en ")
    ids = adapter.encode(samples()[:1], train=False)["input_ids"][0]
    assert "caption en what color is the shape?\n" in adapter.tokenizer.decode(ids)
    with pytest.raises(ConfigError, match="min_pixels not understood"):
        load_adapter(family_dirs("paligemma"), min_pixels=4)


def test_qwen_min_max_pixels_bound_vision_tokens(family_dirs):
    small = load_adapter(family_dirs("qwen2_vl"), max_pixels=32 * 32)
    large = load_adapter(family_dirs("qwen2_vl"), min_pixels=64 * 64, max_pixels=96 * 96)
    sample = samples()[1]
    count = [int(a.encode([sample])["mm_token_type_ids"].sum()) for a in (small, large)]
    assert count[0] == 2  # 64x48 shrunk to 32x16 (<= 32*32 px): 2 merged 16x16 patches
    assert count[1] >= 16  # at least 64*64 px / 16^2
    batch = large.encode([sample])
    assert torch.equal(
        batch["mm_token_type_ids"][0] == 1, batch["input_ids"][0] == large.processor.image_token_id
    )


def test_qwen_pad_equal_to_eos_still_learns_to_stop(tmp_path):
    adapter = load_adapter(build_qwen2_vl(tmp_path, pad_is_eos=True))
    assert adapter.tokenizer.pad_token_id == adapter.tokenizer.eos_token_id
    batch = adapter.encode(samples())
    for row, (_, answer) in enumerate(QUESTIONS):
        labels = batch["labels"][row]
        assert adapter.tokenizer.decode(labels[labels != IGNORE_INDEX]) == answer + "<|im_end|>"
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_llava_appends_eos_its_template_lacks(adapters):
    adapter = adapters("llava")
    ids = adapter.encode(samples()[:1])["input_ids"][0].tolist()
    assert ids[-1] != adapter.tokenizer.eos_token_id  # the template's trailing space follows
    assert adapter.tokenizer.eos_token_id in ids
    assert adapter.tokenizer.eos_token_id in adapter.stop_token_ids()


@pytest.mark.parametrize("family", ["paligemma", "qwen2_5_vl", "llava"])
def test_save_and_load_round_trip(adapters, family, tmp_path):
    adapter = adapters(family)
    adapter.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "preprocessor_config.json" in names or "processor_config.json" in names
    if family != "paligemma":
        assert "chat_template.jinja" in names
    again = load_adapter(tmp_path)
    batch = adapter.encode(samples(), train=False)
    adapter.model.eval()
    with torch.no_grad():
        assert torch.equal(adapter.model(**batch).logits, again.model(**batch).logits)


def test_bad_samples_are_sample_errors(family_dirs):
    adapter = load_adapter(family_dirs("qwen2_vl"), max_length=20)
    with pytest.raises(SampleError, match="exceed max_length 20"):
        adapter.encode(samples()[:1])
    with pytest.raises(SampleError, match="has no image"):
        load_adapter(family_dirs("paligemma")).encode([Sample.vqa("x", None, "q?", ["a"])])
    with pytest.raises(SampleError, match="no assistant turn"):
        adapter.encode([Sample.vqa("y", image(0), "q?", [])])


def test_paligemma_says_when_it_trains_only_a_conversations_first_question(adapters, caplog):
    adapter = adapters("paligemma")
    with caplog.at_level("WARNING"):
        labels = adapter.encode([two_question_chat()])["labels"][0]
    answer = adapter.tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
    assert answer.strip() == "red"
    assert "first question of a conversation only (sample chat has 2)" in caplog.text
