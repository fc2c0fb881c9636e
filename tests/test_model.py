import torch

from conftest import TINY_DINOV2, TINY_LM, tiny_spec
from vlmkit.models.adapters import load_adapter
from vlmkit.models.build import build_vlm
from vlmkit.models.chat_encoding import IGNORE_INDEX

TEXTS = ["what color is the shape ?", "red", "blue", "yes", "no"]


def test_save_load_round_trip_gives_identical_logits(tiny_vlm_dir, easyvqa_samples):
    first = load_adapter(tiny_vlm_dir)
    second = load_adapter(tiny_vlm_dir)
    batch = first.encode(easyvqa_samples[:4], train=False)
    with torch.no_grad():
        a = first.model(**batch).logits
        b = second.model(**batch).logits
    assert torch.equal(a, b)
    assert (tiny_vlm_dir / "model.safetensors").exists()
    assert not list(tiny_vlm_dir.glob("*.bin")) and not list(tiny_vlm_dir.glob("*.pt"))


def test_resave_is_identical(tiny_vlm_dir, easyvqa_samples, tmp_path):
    adapter = load_adapter(tiny_vlm_dir)
    adapter.save(tmp_path)
    again = load_adapter(tmp_path)
    for (name, p), (_, q) in zip(
        adapter.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name


def test_loss_matches_the_language_models_own_loss():
    """Our labelled-positions-only loss equals HF's full-logits loss on the same embeddings."""
    torch.manual_seed(0)
    adapter = build_vlm(
        tiny_spec(
            language_model={
                "config": {**TINY_LM, "model_type": "gemma2", "head_dim": 16, "final_logit_softcapping": 5.0}
            }
        ),
        TEXTS,
    )
    model = adapter.model.eval()
    from PIL import Image

    from vlmkit.data.sample import Sample

    batch = adapter.encode(
        [Sample.vqa("a", Image.new("RGB", (32, 32)), "what color is the shape ?", ["blue"])]
    )
    with torch.no_grad():
        ours = model(**batch).loss
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        reference = model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_no_vocabulary_logits_for_unlabelled_positions(tiny_vlm_dir, easyvqa_samples):
    adapter = load_adapter(tiny_vlm_dir)
    batch = adapter.encode(easyvqa_samples[:8])
    rows = []
    head = adapter.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: rows.append(out.shape))
    adapter.model(**batch).loss.backward()
    handle.remove()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows == [torch.Size([labelled, len(adapter.tokenizer)])]
    assert labelled < batch["input_ids"].numel() / 4


def test_generate_returns_one_string_per_sample(tiny_vlm_dir, easyvqa_samples):
    adapter = load_adapter(tiny_vlm_dir)
    answers = adapter.generate(easyvqa_samples[:5], max_new_tokens=3)
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    sampled = adapter.generate(easyvqa_samples[:2], max_new_tokens=3, do_sample=True, temperature=0.7, seed=1)
    again = adapter.generate(easyvqa_samples[:2], max_new_tokens=3, do_sample=True, temperature=0.7, seed=1)
    assert sampled == again


def test_batched_generation_matches_one_at_a_time(tiny_vlm_dir, easyvqa_samples):
    adapter = load_adapter(tiny_vlm_dir)
    together = adapter.generate(easyvqa_samples[:6], max_new_tokens=4)
    alone = [adapter.generate([s], max_new_tokens=4)[0] for s in easyvqa_samples[:6]]
    assert together == alone


def test_sampled_groups_share_one_prefill_and_draw_what_repeated_prompts_draw(
    tiny_vlm_dir, easyvqa_samples, monkeypatch
):
    """k sampled answers per prompt (GRPO's groups) prefill each prompt once and share its cache;
    with the same seed they are the answers of the prompt repeated k times, through left padding."""
    adapter = load_adapter(tiny_vlm_dir)
    prompts = easyvqa_samples[:6]
    lengths = {int(adapter.encode([p], train=False)["attention_mask"].sum()) for p in prompts}
    assert len(lengths) > 1  # prompts of several lengths: the batch is left-padded
    shared = []
    original = type(adapter.model)._shared_prompt_cache

    def spy(self, *args, **kwargs):
        shared.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(adapter.model), "_shared_prompt_cache", spy)
    options = {"num_return_sequences": 4}
    grouped = adapter.generate(prompts, max_new_tokens=4, do_sample=True, seed=5, generation_options=options)
    assert shared == [len(prompts)]  # one prefill row per prompt, not per answer
    repeated = [p for p in prompts for _ in range(4)]
    assert grouped == adapter.generate(repeated, max_new_tokens=4, do_sample=True, seed=5)
    assert len(set(grouped)) > len(prompts)  # the answers within groups differ: sampling happened


def test_auto_classes_know_the_model(tiny_vlm_dir):
    import transformers

    import vlmkit

    model = transformers.AutoModel.from_pretrained(tiny_vlm_dir)
    assert isinstance(model, vlmkit.VisionLanguageModel)
    assert transformers.AutoConfig.from_pretrained(tiny_vlm_dir).model_type == "vlmkit_vlm"


def test_freeze_flags():
    adapter = build_vlm(tiny_spec(), TEXTS)
    adapter.model.set_trainable(vision=False, projector=True, lm=False)
    trainable = {name.split(".")[0] for name, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}


def test_tokenizer_is_trained_and_saved_with_chat_template(tiny_vlm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    assert tokenizer.chat_template
    assert "<image>" in tokenizer.get_vocab()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what color"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<assistant> ")


def test_pretrained_parts_keep_their_weights(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from conftest import TINY_VISION

    seed_adapter = build_vlm(tiny_spec(), TEXTS)
    lm_dir, vision_dir = tmp_path / "lm", tmp_path / "vision"
    seed_adapter.model.language_model.save_pretrained(lm_dir)
    seed_adapter.tokenizer.save_pretrained(lm_dir)
    AutoModel.from_config(AutoConfig.for_model(**TINY_VISION)).save_pretrained(vision_dir)
    adapter = build_vlm(
        tiny_spec(vision={"pretrained": str(vision_dir)}, language_model={"pretrained": str(lm_dir)})
    )
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    for name, tensor in adapter.model.language_model.state_dict().items():
        assert torch.equal(tensor, lm[name]), name
    tower = AutoModel.from_pretrained(vision_dir).state_dict()
    for name, tensor in adapter.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, tower[name]), name
    assert len(adapter.tokenizer) == len(AutoTokenizer.from_pretrained(lm_dir))


def test_every_trainable_parameter_gets_a_gradient_with_a_dinov2_tower(easyvqa_samples):
    """DINOv2's masked-image-modelling token is unused by a VLM: it stays frozen (else DDP asks
    for find_unused_parameters and an FSDP checkpoint lacks its optimizer state)."""
    texts = [m["content"] for s in easyvqa_samples for m in s.messages]
    adapter = build_vlm(tiny_spec(vision={"config": TINY_DINOV2}), texts)
    model = adapter.model
    model.set_trainable(vision=True)
    model(**adapter.encode(easyvqa_samples[:4], train=True)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert not model.vision_tower.embeddings.mask_token.requires_grad
