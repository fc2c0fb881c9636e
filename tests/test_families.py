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
    answers, plain = generate_plain(merged, family)
    assert plain == answers


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
def test_grpo_samples_each_group_from_its_own_prompt(family_dirs, family):
    """GRPO encodes each prompt once and lets `generate` expand it (`num_return_sequences`): at a
    temperature near 0 the sampled group is the prompt's greedy answer, group by group, in every
    family (its pixel rows travel with their prompt), whether prompts are sampled together or not."""
    from collections import defaultdict

    from vlmkit.train.objectives.grpo import GRPOLoss
    from vlmkit.train.objectives.options import GRPOOptions

    adapter = load_adapter(family_dirs(family))
    greedy = adapter.generate(samples(), max_new_tokens=4)
    for per_call in (None, 1):
        layer = object.__new__(GRPOLoss)
        layer.adapter, layer._objective_metrics = adapter, defaultdict(list)
        layer.grpo = GRPOOptions(
            num_generations=3, temperature=1e-6, max_new_tokens=4, generation_batch_size=per_call
        )
        sampled = layer.sample_answers(adapter.model, samples())
        assert sampled == [answer for answer in greedy for _ in range(3)]
        assert adapter.model.training  # back in train mode for the loss


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


HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision (PixtralProcessor imports it)")
def test_llava_folder_with_pixtral_tower_is_fed_pixtrals_own_image_layout(family_dirs):
    """The input vlmkit trains on is the one PixtralProcessor (so transformers and vLLM) builds:
    rows of [IMG] each closed by [IMG_BREAK], the last by [IMG_END] -- not LLaVA's plain [IMG] run."""
    adapter = load_adapter(family_dirs("llava_pixtral"))
    assert type(adapter.processor).__name__ == "PixtralProcessor"
    sample = samples()[0]
    batch = adapter.encode([sample])
    ids = batch["input_ids"][0].tolist()
    token = adapter.tokenizer.convert_tokens_to_ids
    img, brk, end = token("[IMG]"), token("[IMG_BREAK]"), token("[IMG_END]")
    rows, cols = (side // 8 for side in adapter.processor.image_processor.preprocess(
        sample.images[0], return_tensors="pt"
    )["image_sizes"][0].tolist())  # fmt: skip
    layout = ([img] * cols + [brk]) * rows
    layout[-1] = end
    first = ids.index(img)
    assert ids[first : first + len(layout)] == layout and ids.count(img) == rows * cols
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    prompt = adapter.processor.apply_chat_template(messages, tokenize=False)
    own = adapter.processor(text=prompt, images=list(sample.images), return_tensors="pt")["input_ids"][0]
    assert ids[: len(own)] == own.tolist()  # the prompt vlmkit trains on is the processor's own
    labels = batch["labels"][0].tolist()
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels, strict=True) if i in (img, brk, end))
    assert torch.isfinite(adapter.model(**batch).loss)


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the refusal where torchvision is missing")
def test_llava_folder_with_pixtral_tower_without_torchvision_is_refused_in_one_line(family_dirs):
    """Without torchvision its PixtralProcessor cannot be built: one line, never LlavaProcessor's
    plain [IMG] run in its place (a different input than transformers feeds the same model)."""
    with pytest.raises(ModelLoadError) as info:
        load_adapter(family_dirs("llava_pixtral"))
    message = str(info.value)
    assert "PixtralProcessor" in message and "torchvision" in message and "\n" not in message


def generate_plain(merged, family: str) -> tuple[list[str], list[str]]:
    """vlmkit's greedy answers from `merged`, and plain transformers' (the family's class, no vlmkit)."""
    import transformers

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
    return answers, [t.strip() for t in texts]


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cli_trains_evaluates_and_exports_each_family(
    family_dirs, family, method, tmp_path, monkeypatch, capsys
):
    """`vlmkit train` (LoRA or QLoRA on the family's folder, 2 steps), `vlmkit eval` on the run's
    model, then `vlmkit export --merge`, whose folder plain transformers loads and generates
    vlmkit's tokens from: the commands a user types, nothing per family in the config but the folder."""
    import json

    import yaml

    from test_cli import run_cli, write_config

    model: dict = {"pretrained": str(family_dirs(family)), "lora": {"r": 2}}
    if method == "qlora":
        from test_peft import bitsandbytes_cpu_reason

        if (reason := bitsandbytes_cpu_reason()) is not None:
            pytest.skip(reason)
        model["quantization"] = {"compute_dtype": "float32"}
    config = {
        "name": family,
        "output_dir": str(tmp_path / "run"),
        "model": model,
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
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert (resolved["model"]["quantization"] is not None) == (method == "qlora")
    trainable = json.loads((run / "trainable.json").read_text())
    assert trainable["trainable"] and all("lora_" in name for name in trainable["trainable"])
    full = sum(p.numel() for p in load_adapter(family_dirs(family)).model.parameters())
    lora = trainable["trainable_parameters"]
    # 4-bit weights pack two values a byte, so a QLoRA model counts fewer elements than its base
    assert (trainable["total_parameters"] < full) == (method == "qlora"), (trainable, full)
    if method == "lora":
        assert trainable["total_parameters"] == full + lora
    evaluated = tmp_path / "ev"
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "--model", str(run / "model"), "--data", "easyvqa:test",
        "--limit", "4", "--batch-size", "2", "--out", str(evaluated),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["n"] == 4 and len((evaluated / "predictions.jsonl").read_text().splitlines()) == 4
    assert summary["metric"] == "exact_match" and "exact_match" in out
    code, _, err = run_cli(monkeypatch, capsys, "export", str(run), str(tmp_path / "merged"))
    assert code == 0, err
    merged = tmp_path / "merged"
    assert not (merged / "adapter_config.json").exists()
    config_json = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config_json  # merged into the unquantised base
    answers, plain = generate_plain(merged, family)
    assert plain == answers
