"""The losses of the three original transformers families, recorded before the generic adapter.

Issue 15 replaced the per-family adapters (PaliGemma, Qwen2-VL/2.5-VL, LLaVA) by one generic,
processor-based adapter; these values were recorded with the old adapters (commit 6c8c249) on the
same tiny random checkpoints, so any change to what the model is fed (ids, labels, pixels, token
types) shows up here.
"""

import pytest
import torch

from tiny_models import image
from vlmkit.data.sample import Sample
from vlmkit.models.adapters import load_adapter

pytest_plugins = ["tiny_families"]

# family -> (loss before any step, loss after 2 SGD steps), recorded at 6c8c249.
RECORDED = {
    "paligemma": (7.27639627456665, 2.5351905822753906),
    "paligemma2": (7.21762228012085, 4.715996742248535),
    "qwen2_vl": (5.978564262390137, 3.307678461074829),
    "qwen2_5_vl": (5.992301940917969, 2.8100154399871826),
    "llava": (5.770498752593994, 2.3515305519104004),
}


def batch_samples() -> list[Sample]:
    return [
        Sample.vqa("a", image(0, (40, 32)), "what color is the shape?", ["red"]),
        Sample.vqa("b", image(1, (64, 48)), "How many bars are in the chart?", ["42 million"]),
        Sample(
            id="chat",
            image=image(2),
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "what color is the shape?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "How many bars?"},
                {"role": "assistant", "content": "42"},
            ],
        ),
    ]


def losses(folder) -> tuple[float, float]:
    torch.manual_seed(0)
    adapter = load_adapter(folder)
    model = adapter.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    samples = batch_samples()
    if adapter.model.config.model_type == "paligemma":
        samples = samples[:2]  # PaliGemma trains one question per sample
    batch = adapter.encode(samples, train=True)
    first = None
    for _ in range(3):
        loss = model(**batch).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, loss.item()


@pytest.mark.parametrize("family", sorted(RECORDED))
def test_losses_match_the_values_recorded_before_the_generic_adapter(family_dirs, family):
    assert losses(family_dirs(family)) == pytest.approx(RECORDED[family], rel=1e-5)
