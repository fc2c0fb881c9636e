"""Every family record on a tiny random checkpoint: labels, LoRA, freeze, generate, merged export.

The same checks run for each family through the generic adapter; nothing here is per-family but
the end-of-turn token the template writes. The merged export is loaded by plain transformers
(the family's class and `generate`, no vlmkit code) and must give vlmkit's greedy tokens.
"""

import importlib.util

import pytest
import torch

from tiny_models import image
from vlmkit.config import Freeze, LoraSpec, Stage
from vlmkit.data.sample import Sample
from vlmkit.errors import ModelLoadError
from vlmkit.models.adapters import load_adapter
from vlmkit.models.adapters.families import FAMILIES, family_of
from vlmkit.models.chat_encoding import IGNORE_INDEX
from vlmkit.train.peft import apply_lora, part_of

pytest_plugins = ["tiny_families"]

NEEDS_TORCHVISION = {"mistral3"}  # PixtralProcessor's module imports torchvision
END = {
    "paligemma": "<eos>",
    "qwen2_vl": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "qwen3_vl": "<|im_end|>",
    "llava": "</s>",
    "llava_next": "</s>",
    "llava_onevision": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "gemma3": "<end_of_turn>",
    "internvl": "<|im_end|>",
    "mistral3": "</s>",
}
FAMILY_NAMES = [
    pytest.param(
        name,
        marks=[
            *(
                [
                    pytest.mark.skipif(
                        importlib.util.find_spec("torchvision") is None, reason="needs torchvision"
                    )
                ]
                if name in NEEDS_TORCHVISION
                else []
            ),
        ],
    )
    for name in END
]
QA = [("what color is the shape?", "red"), ("How many bars are in the chart?", "42 million")]


def samples() -> list[Sample]:
    return [
        Sample.vqa("a", image(0, (40, 32)), QA[0][0], [QA[0][1]]),
        Sample.vqa("b", image(1, (64, 48)), QA[1][0], [QA[1][1]]),
    ]


def test_every_family_is_recorded_and_mllama_is_refused_in_one_line():
    assert set(END) <= set(FAMILIES)
    with pytest.raises(ModelLoadError, match=r"mllama.*cross-attention"):
        family_of("mllama")
    with pytest.raises(
        ModelLoadError, match=r"no vlmkit family record for model type 'blip_2'.*families\.py"
    ):
        family_of("blip_2")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_labels_loss_and_lora_gradients(family_dirs, family):
    adapter = load_adapter(family_dirs(family))
    batch = adapter.encode(samples(), train=True)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row, (_, answer) in enumerate(QA):
        positions = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert adapter.tokenizer.decode(labels[row][positions]) == answer + END[family]
        assert torch.equal(labels[row][positions], ids[row][positions])
        assert positions.tolist() == list(range(int(positions[0]), int(positions[-1]) + 1))
    assert (labels[mask == 0] == IGNORE_INDEX).all()  # padding never labelled
    for token in adapter.image_token_ids() if hasattr(adapter, "image_token_ids") else ():
        assert (labels[ids == token] == IGNORE_INDEX).all()  # nor image / vision-marker tokens
    apply_lora(adapter, LoraSpec(r=2), quantized=False)
    loss = adapter.model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in adapter.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_freeze_of_each_part_is_proved_by_trainable_counts(family_dirs, family):
    from vlmkit.train.runner import apply_freeze

    adapter = load_adapter(family_dirs(family))
    parts = family_of(adapter.model.config.model_type).parts
    sizes = {"vision": 0, "projector": 0, "language": 0}
    for name, parameter in adapter.model.named_parameters():
        sizes[part_of(name.rsplit(".", 1)[0], parts) or "language"] += parameter.numel()
    assert all(sizes.values()), sizes  # every part's paths exist in this family's model
    total = sum(sizes.values())
    for part, flag in (("vision", "vision"), ("projector", "projector"), ("language", "lm")):
        report = apply_freeze(adapter, Stage(name=part, freeze=Freeze(**{flag: True})))
        assert report["trainable_parameters"] == total - sizes[part]
    assert apply_freeze(adapter, Stage(name="all", freeze=Freeze()))["trainable_parameters"] == total


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merged_export_generates_vlmkit_tokens_with_plain_transformers(family_dirs, family, tmp_path):
    import transformers

    from vlmkit.train.export import export_merged

    adapter = load_adapter(family_dirs(family))
    apply_lora(adapter, LoraSpec(r=2), quantized=False)
    with torch.no_grad():  # move the LoRA weights off zero so the merge changes something
        for name, parameter in adapter.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapter.save(tmp_path / "lora")
    merged = export_merged(tmp_path / "lora", tmp_path / "merged")
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= names
    assert "chat_template.jinja" in names or family == "paligemma"  # PaliGemma has no chat template
    vlmkit_adapter = load_adapter(merged)
    answers = vlmkit_adapter.generate(samples(), max_new_tokens=4)
    batch = vlmkit_adapter.encode(samples(), train=False)
    plain = getattr(transformers, FAMILIES[family].model_class).from_pretrained(merged).eval()
    out = plain.generate(
        **batch, max_new_tokens=4, do_sample=False, eos_token_id=vlmkit_adapter.stop_token_ids()
    )
    texts = vlmkit_adapter.tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert [t.strip() for t in texts] == answers


MULTI_IMAGE = ["qwen2_vl", "llava", "llava_onevision", "idefics3", "gemma3", "internvl"]


@pytest.mark.parametrize("family", MULTI_IMAGE)
def test_interleaved_images_and_text_only_rows_in_one_batch(family_dirs, family):
    """Two image parts in one turn, and a text-only sample beside it: the processor lays out each
    image where its part is; the text-only row has no image tokens; labels stay the answers."""
    adapter = load_adapter(family_dirs(family))
    two = Sample(
        id="two",
        image=[image(3), image(4, (48, 40))],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what color is"},
                    {"type": "image"},
                    {"type": "text", "text": "and"},
                    {"type": "image"},
                ],
            },
            {"role": "assistant", "content": "red"},
        ],
    )
    text_only = Sample.vqa("text", None, "How many bars?", ["42 million"])
    batch = adapter.encode([two, text_only], train=True)
    token = adapter.processor.image_token_id
    runs = (batch["input_ids"][0] == token).int().diff().eq(1).sum()
    assert runs == 2 or family == "idefics3"  # two separate image runs (idefics3: tiles, more runs)
    assert int((batch["input_ids"][1] == token).sum()) == 0
    for row, answer in enumerate(["red", "42 million"]):
        labels = batch["labels"][row]
        assert adapter.tokenizer.decode(labels[labels != IGNORE_INDEX]) == answer + END[family]
    assert torch.isfinite(adapter.model(**batch).loss)
    with pytest.raises(Exception, match="2 image part"):
        adapter.encode([Sample(id="bad", image=[image(3)], messages=two.messages)])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_chat_and_serve_answer_as_generate_does(family_dirs, family, tmp_path):
    """`vlmkit chat` (a two-turn conversation) and `vlmkit serve` (the official openai client)
    give each family's own greedy answers: the serving and chat layers add nothing per family."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from test_serve import data_url, live_server
    from vlmkit.data.images import load_image
    from vlmkit.serve import ServeSettings
    from vlmkit.serve.app import create_app
    from vlmkit.serve.chat import chat_loop

    adapter = load_adapter(family_dirs(family))
    path = tmp_path / "picture.png"
    image(0, (40, 32)).save(path)
    picture = load_image(path)
    questions = iter([QA[0][0], QA[1][0]])

    def read() -> str:
        return next(questions, "")

    said: list[str] = []
    history = chat_loop(adapter, path, read, said.append, max_new_tokens=6)
    first = [{"role": "user", "content": QA[0][0]}]
    assert said[0] == adapter.generate([Sample(id="1", image=picture, messages=first)], max_new_tokens=6)[0]
    second = [*first, {"role": "assistant", "content": said[0]}, {"role": "user", "content": QA[1][0]}]
    assert said[1] == adapter.generate([Sample(id="2", image=picture, messages=second)], max_new_tokens=6)[0]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    with live_server(create_app(adapter, ServeSettings(batch_wait_ms=0))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        content = [
            {"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}},
            {"type": "text", "text": QA[0][0]},
        ]
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], max_tokens=6
        )
    assert reply.choices[0].message.content == said[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_qlora_puts_each_family_in_4bit_and_trains_only_lora(family_dirs, family):
    """`quantization` (QLoRA) on every family: its linear layers load as bitsandbytes 4-bit,
    the loss is finite, LoRA gets gradients and nothing else does (bitsandbytes' CPU backend)."""
    from test_peft import bitsandbytes_cpu_reason

    reason = bitsandbytes_cpu_reason()
    if reason is not None:
        pytest.skip(reason)
    import bitsandbytes as bnb

    from vlmkit.config import QuantizationSpec

    adapter = load_adapter(family_dirs(family), quantization=QuantizationSpec(compute_dtype="float32"))
    quantized = [
        name for name, module in adapter.model.named_modules() if isinstance(module, bnb.nn.Linear4bit)
    ]
    parts = FAMILIES[family].parts
    assert any(part_of(name, parts) == "language" for name in quantized), quantized[:3]
    apply_lora(adapter, LoraSpec(r=2), quantized=True)
    adapter.model.train()
    loss = adapter.model(**adapter.encode(samples())).loss
    loss.backward()
    assert torch.isfinite(loss)
    trained = {
        name for name, p in adapter.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert trained and all("lora_" in name for name in trained)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cli_trains_lora_and_evaluates_each_family(family_dirs, family, tmp_path, monkeypatch, capsys):
    """`vlmkit train` (LoRA on the family's folder, 2 steps) then `vlmkit eval` on the run's model:
    the commands a user types, with nothing per family in the config but the folder."""
    import json

    from test_cli import run_cli, write_config

    config = {
        "name": family,
        "output_dir": str(tmp_path / "run"),
        "model": {"pretrained": str(family_dirs(family)), "lora": {"r": 2}},
        "data": {"train": {"source": "easyvqa", "split": "train", "limit": 8}},
        "training": {
            "per_device_train_batch_size": 4,
            "max_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-3,
        },
    }
    code, _, err = run_cli(monkeypatch, capsys, "train", str(write_config(tmp_path, config)))
    assert code == 0, err
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["bad_samples"] == 0
    assert (run / "model" / "adapter_model.safetensors").exists()
    evaluated = tmp_path / "ev"
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--model", str(run / "model"), "--data", "easyvqa:test",
        "--limit", "4", "--batch-size", "2", "--out", str(evaluated),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["n"] == 4 and len((evaluated / "predictions.jsonl").read_text().splitlines()) == 4
    assert summary["metric"] == "exact_match" and "exact_match" in out
