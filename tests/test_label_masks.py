"""Label masks: loss falls exactly on answer tokens + end-of-turn, never on image/prompt/padding."""

import pytest
import torch

from conftest import TINY_DINOV2, tiny_spec
from vlmkit.data.sample import Sample
from vlmkit.models.build import build_vlm
from vlmkit.models.chat_encoding import IGNORE_INDEX

DINO = TINY_DINOV2
SIGLIP = {**DINO, "model_type": "siglip_vision_model"}
TEXTS = ["what color is the shape ?", "red", "blue", "is it round ?", "yes", "no", "and now ?"]


def labelled_tokens(adapter, batch, row):
    labels = batch["labels"][row]
    return adapter.tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())


@pytest.mark.parametrize("projector", ["linear", "mlp"])
@pytest.mark.parametrize(
    ("vision", "select", "image_size", "expected_tokens"),
    [
        (DINO, "cls_patch", 32, 1 + 16),
        (DINO, "patch", 32, 16),
        (DINO, "cls", 32, 1),
        (SIGLIP, "patch", 32, 16),
        (
            {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
            "cls_patch",
            64,
            1 + 64,
        ),
        (
            {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
            "patch",
            64,
            64,
        ),
    ],
)
def test_mask_and_image_tokens(projector, vision, select, image_size, expected_tokens):
    adapter = build_vlm(
        tiny_spec(
            vision={"config": vision}, projector=projector, feature_select=select, image_size=image_size
        ),
        TEXTS,
    )
    config = adapter.model.config
    assert config.num_image_tokens == expected_tokens
    samples = [
        Sample.vqa("a", _image(image_size), "what color is the shape ?", ["red"]),
        Sample.vqa("b", _image(image_size), "is it round ?", ["yes"]),
    ]
    batch = adapter.encode(samples, train=True)
    for row, answer in enumerate(["red", "yes"]):
        assert labelled_tokens(adapter, batch, row) == [answer, "<eos>"]
        ids = batch["input_ids"][row]
        assert int((ids == config.image_token_id).sum()) == expected_tokens
        labels = batch["labels"][row]
        assert not (labels[ids == config.image_token_id] != IGNORE_INDEX).any()
        assert not (labels[batch["attention_mask"][row] == 0] != IGNORE_INDEX).any()
    features = adapter.model.get_image_features(batch["pixel_values"])
    assert features.shape[1] == expected_tokens
    assert features.shape[2] == adapter.model.config.text_config.hidden_size


def test_multi_turn_labels_every_assistant_turn_and_no_user_turn():
    adapter = build_vlm(tiny_spec(), TEXTS)
    sample = Sample(
        id="m",
        image=_image(32),
        messages=[
            {"role": "user", "content": "what color is the shape ?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "and now ?"},
            {"role": "assistant", "content": "blue"},
        ],
    )
    batch = adapter.encode([sample], train=True)
    assert labelled_tokens(adapter, batch, 0) == ["red", "<eos>", "blue", "<eos>"]


def test_generation_prompt_has_no_answer_and_is_left_padded():
    adapter = build_vlm(tiny_spec(), TEXTS)
    samples = [
        Sample.vqa("a", _image(32), "what color is the shape ?", ["red"]),
        Sample.vqa("b", _image(32), "is it round ?", ["yes"]),
    ]
    batch = adapter.encode(samples, train=False)
    assert "labels" not in batch
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch["input_ids"][1].tolist())
    assert tokens[-1] == "<assistant>" and "yes" not in tokens
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1


def test_repeated_images_are_encoded_once_and_give_the_same_loss():
    torch.manual_seed(0)
    adapter = build_vlm(tiny_spec(), TEXTS)
    adapter.model.eval()
    image = _image(32)
    samples = [
        Sample.vqa("a", image, "what color is the shape ?", ["red"]),
        Sample.vqa("b", image, "is it round ?", ["yes"]),
    ]
    shared = adapter.encode(samples)
    assert shared["pixel_values"].shape[0] == 1 and shared["image_index"].tolist() == [0, 0]
    separate = dict(shared)
    separate["pixel_values"] = shared["pixel_values"].repeat(2, 1, 1, 1)
    del separate["image_index"]
    with torch.no_grad():
        assert torch.allclose(adapter.model(**shared).loss, adapter.model(**separate).loss)


def _image(size):
    from PIL import Image

    return Image.new("RGB", (size, size), (10, 200, 30))


def test_text_only_rows_mix_with_image_rows():
    adapter = build_vlm(tiny_spec(), TEXTS)
    samples = [
        Sample.vqa("img", _image(32), "what color is the shape ?", ["red"]),
        Sample.vqa("txt", None, "is it round ?", ["yes"]),
    ]
    batch = adapter.encode(samples, train=True)
    image_id = adapter.model.config.image_token_id
    assert int((batch["input_ids"][0] == image_id).sum()) == adapter.model.config.num_image_tokens
    assert int((batch["input_ids"][1] == image_id).sum()) == 0
    assert batch["pixel_values"].shape[0] == 1
    assert labelled_tokens(adapter, batch, 1) == ["yes", "<eos>"]
    assert torch.isfinite(adapter.model(**batch).loss)
    text_only = adapter.encode([samples[1]], train=True)
    assert "pixel_values" not in text_only and torch.isfinite(adapter.model(**text_only).loss)


def test_zero3_runs_the_tower_on_text_only_batches(monkeypatch):
    """Under ZeRO-3 every rank must touch the vision tower each step (else the gather hangs)."""
    import vlmkit.models.vlm as vlm

    adapter = build_vlm(tiny_spec(), TEXTS)
    batch = adapter.encode([Sample.vqa("txt", None, "is it round ?", ["yes"])], train=True)
    model = adapter.model.train()
    monkeypatch.setattr(vlm, "is_deepspeed_zero3_enabled", lambda: True)
    with torch.no_grad():
        plain = model(**batch).loss
    model(**batch).loss.backward()
    grads = [p.grad for p in model.vision_tower.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)  # the tower took part in the graph
    monkeypatch.setattr(vlm, "is_deepspeed_zero3_enabled", lambda: False)
    with torch.no_grad():
        assert torch.allclose(model(**batch).loss, plain)  # and the loss is unchanged
