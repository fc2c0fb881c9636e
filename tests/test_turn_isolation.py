"""Merged questions with isolated turns compute each turn exactly as its own row would."""

import json

import pytest
import torch

from conftest import tiny_spec
from tiny_models import image
from vlmkit.data.conversations import INDEPENDENT_TURNS
from vlmkit.data.sample import Sample
from vlmkit.models.build import build_vlm
from vlmkit.models.chat_encoding import IGNORE_INDEX
from vlmkit.models.turn_isolation import isolation_inputs, turn_segments

TEXTS = ["what color is the shape ?", "red", "blue", "is it round ?", "yes", "no", "what shape ?", "circle"]
TURNS = [("what color is the shape ?", "red"), ("is it round ?", "no"), ("what shape ?", "circle")]


def merged_sample(independent: bool = True) -> Sample:
    messages = [
        m for q, a in TURNS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    meta = {INDEPENDENT_TURNS: True} if independent else {}
    return Sample(id="m", image=image(1), messages=messages, meta=meta)  # type: ignore[arg-type]


def test_segments_follow_the_answers():
    labels = [IGNORE_INDEX] * 3 + [7, 8] + [IGNORE_INDEX] * 2 + [9, 8] + [IGNORE_INDEX]
    assert turn_segments(labels, prefix_len=2) == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="image prefix"):
        turn_segments(labels, prefix_len=6)


def test_mask_lets_a_turn_see_the_prefix_and_itself_only():
    mask, positions = isolation_inputs([[0, 0, 0, 1, 1], None], [2, 0], [5, 3], width=5)
    m = mask[0, 0]
    assert m[3, :2].all() and m[3, 3] and not m[3, 2] and not m[3, 4]  # prefix + itself, not turn 0's text
    assert m[4, 3] and m[4, 4] and not m[4, 2]
    assert positions[0].tolist() == [0, 1, 2, 2, 3]  # turn 1 continues from the 2-token prefix
    assert torch.equal(mask[1, 0, :3, :3], torch.ones(3, 3, dtype=torch.bool).tril())  # a plain row is causal
    assert mask[1, 0, 4, 4] and not mask[1, 0, 4, :4].any()  # padding sees itself only


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_turn_matches_a_row_of_the_prefix_and_that_turn(attention):
    torch.manual_seed(0)
    adapter = build_vlm(tiny_spec(projector="linear"), TEXTS)
    model = adapter.model.eval()
    model.language_model.set_attn_implementation(attention)
    single = Sample.vqa("s", image(2), "is it round ?", ["yes"])
    batch = adapter.encode([merged_sample(), single], train=True)
    assert batch["attention_mask"].shape[:2] == (2, 1)
    with torch.no_grad():
        merged_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    prefix = int((ids == model.config.image_token_id).nonzero().max()) + 1
    n = int((batch["attention_mask"][0, 0].diagonal()).sum())  # every real token sees itself
    segments = turn_segments(labels[:n].tolist(), prefix)
    assert max(segments) == len(TURNS) - 1
    for turn in range(len(TURNS)):
        cols = [i for i, s in enumerate(segments) if s == turn and (turn == 0 or i >= prefix)]
        row = torch.cat([ids[:prefix], ids[cols]]) if turn else ids[: cols[-1] + 1]
        with torch.no_grad():
            alone = model(
                input_ids=row[None],
                pixel_values=batch["pixel_values"][:1],
                attention_mask=torch.ones(1, len(row)),
            ).logits[0]
        torch.testing.assert_close(merged_logits[cols], alone[-len(cols) :], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # flex attention compiles its kernel (~15 s on 2 cores)
def test_flex_attention_takes_the_isolation_mask_as_a_block_mask():
    """Flex attention skips the masked-out blocks; it must compute what sdpa computes with the
    dense mask. (Set directly: `model.speed.attention` keeps flex for CUDA, where transformers'
    own flex masks are sound; vlmkit's isolation mask is also exact on the CPU.)"""
    torch.manual_seed(0)
    adapter = build_vlm(tiny_spec(projector="linear"), TEXTS)
    model = adapter.model.eval()
    batch = adapter.encode([merged_sample(), Sample.vqa("s", image(2), "is it round ?", ["yes"])], train=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model(**inputs).logits, model(**batch).loss

    sdpa_logits, sdpa_loss = run()
    model.language_model.set_attn_implementation("flex_attention")
    assert type(model._custom_mask(batch["attention_mask"], torch.float32)).__name__ == "BlockMask"
    flex_logits, flex_loss = run()
    torch.testing.assert_close(flex_logits, sdpa_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flex_loss, sdpa_loss, rtol=1e-5, atol=1e-6)


def test_isolated_training_batch_has_finite_loss_and_gradients():
    adapter = build_vlm(tiny_spec(projector="linear"), TEXTS)
    batch = adapter.encode(
        [merged_sample(), Sample.vqa("s", image(2), "what shape ?", ["circle"])], train=True
    )
    loss = adapter.model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in adapter.model.parameters() if p.grad is not None)


def test_a_real_conversation_keeps_plain_causal_attention():
    batch = build_vlm(tiny_spec(), TEXTS).encode([merged_sample(independent=False)], train=True)
    assert batch["attention_mask"].dim() == 2 and "position_ids" not in batch


def test_every_merged_answer_and_only_the_answers_carry_labels():
    adapter = build_vlm(tiny_spec(), TEXTS)
    batch = adapter.encode([merged_sample()], train=True)
    labels = batch["labels"][0]
    tokens = adapter.tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())
    assert tokens == [t for _, answer in TURNS for t in (answer, "<eos>")]


def test_a_run_trains_on_merged_questions_through_trainer(tmp_path):
    from conftest import tiny_config
    from vlmkit.config import parse_config
    from vlmkit.train.runner import train

    raw = tiny_config(
        tmp_path,
        **{
            "data.train": {"source": "easyvqa", "split": "test", "limit": 48, "turns_per_image": 4},
            "training.per_device_train_batch_size": 4,
            "training.max_steps": 3,
            "training.save_strategy": "no",
        },
    )
    result = train(parse_config(raw))
    history = json.loads((result.run_dir / "metrics.json").read_text())["history"]
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (result.model_dir / "model.safetensors").exists()


def test_merged_turns_with_the_image_after_the_text_are_refused():
    from vlmkit.errors import SampleError

    adapter = build_vlm(tiny_spec(image_placement="after_text"), TEXTS)
    with pytest.raises(SampleError, match="image before the text"):
        adapter.encode([merged_sample()], train=True)
