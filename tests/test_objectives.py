"""DPO and GRPO: vlmkit's losses equal TRL's on the same model, batch and completions (item 4)."""

from __future__ import annotations

import copy
import types
from collections import defaultdict

import pytest
import torch
from torch import nn

from vlmkit.data.sample import Sample
from vlmkit.train.objectives.common import token_logps
from vlmkit.train.objectives.dpo import dpo_loss, pair_logps, pairs_of
from vlmkit.train.objectives.options import DPOOptions

trl_utils = pytest.importorskip("trl.trainer.utils")

pytest_plugins = ["tiny_families"]


class StubAccelerator:
    """What TRL's loss code asks of an Accelerator in one process."""

    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, model):
        return model

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


class FusedVLM(nn.Module):
    """vlmkit's VLM with TRL's fused LM head on its language model: TRL computes the log-probabilities."""

    def __init__(self, vlm: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.vlm = vlm
        trl_utils.add_fused_lm_head(
            vlm.language_model,
            temperature=temperature,
            outputs=("log_probs", "entropy", "mean_logits", "is_top1"),
        )

    def forward(self, input_ids, pixel_values=None, attention_mask=None, image_index=None, **kwargs):
        kwargs.pop("use_cache", None)
        embeds = self.vlm.embed(input_ids, pixel_values, image_index)
        return self.vlm.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


def fused_family(model: nn.Module) -> nn.Module:
    """A transformers VLM with TRL's fused head, as TRL's trainers patch it."""
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def preference_samples(samples: list[Sample], count: int = 4) -> list[Sample]:
    wrong = {"yes": "no", "no": "yes"}
    pairs = []
    for sample in samples[:count]:
        answer = sample.answers[0]
        pairs.append(
            Sample(
                id=sample.id,
                image=sample.image,
                messages=sample.messages,
                answers=sample.answers,
                meta={"rejected": wrong.get(answer, "circle" if answer != "circle" else "red")},
            )
        )
    return pairs


def trl_dpo(
    model: nn.Module, batch: dict, ref: torch.Tensor, beta: float, loss_type: str, sft_weight: float = 0.0
) -> torch.Tensor:
    """TRL 1.x DPOTrainer._compute_loss on `batch` (chosen rows, then rejected rows); `sft_weight`
    adds TRL's "sft" loss type with that weight (RPO)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    stub = types.SimpleNamespace(
        model=model,
        accelerator=StubAccelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type, "sft"] if sft_weight else [loss_type],
        loss_weights=[1.0, sft_weight] if sft_weight else [1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(),
    )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["completion_mask"] = (batch["labels"] != -100).long()
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref.chunk(2)
    return DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def vlm_adapter(tiny_vlm_dir):
    from vlmkit.models.adapters import load_adapter

    torch.manual_seed(0)
    return load_adapter(tiny_vlm_dir)


def check_dpo_matches_trl(adapter, trl_model, samples, loss: str, sft_weight: float = 0.0) -> None:
    model = adapter.model
    model.train()
    batch = adapter.encode(pairs_of(samples), train=True)
    labelled = batch["labels"] != -100
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])  # TRL's label convention
    with torch.no_grad():
        reference, _ = pair_logps(model, batch)
        reference = reference + torch.randn_like(reference)  # a reference that differs from the policy
    options = DPOOptions(beta=0.3, loss=loss, sft_weight=sft_weight)
    logps, tokens = pair_logps(model, batch)
    chosen, rejected = logps.chunk(2)
    ours, stats = dpo_loss(chosen, rejected, *reference.chunk(2), options, *tokens.chunk(2))
    ours.backward()
    our_grads = grads(model)
    theirs = trl_dpo(trl_model, batch, reference, beta=0.3, loss_type=loss, sft_weight=sft_weight)
    theirs.backward()
    their_grads = grads(model)
    assert abs(float(ours) - float(theirs)) < 1e-5
    assert_same_grads(our_grads, their_grads)
    assert 0.0 <= float(stats["rewards/accuracies"]) <= 1.0


@pytest.mark.parametrize(("loss", "sft_weight"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.7)])
def test_dpo_loss_and_gradient_equal_trls_on_vlmkit_vlm(vlm_adapter, easyvqa_samples, loss, sft_weight):
    adapter = copy.deepcopy(vlm_adapter)
    check_dpo_matches_trl(
        adapter, FusedVLM(copy.copy(adapter.model)), preference_samples(easyvqa_samples), loss, sft_weight
    )


@pytest.mark.parametrize("family", ["paligemma2", "qwen2_vl"])
def test_dpo_loss_equals_trls_on_transformers_families(family_dirs, easyvqa_samples, family):
    from vlmkit.models.adapters import load_adapter

    torch.manual_seed(0)
    adapter = load_adapter(family_dirs(family), dtype=torch.float32)
    check_dpo_matches_trl(
        adapter, fused_family(adapter.model), preference_samples(easyvqa_samples, 2), "sigmoid"
    )


def test_dpo_gradient_at_small_beta_is_the_closed_form(vlm_adapter, easyvqa_samples):
    """As beta -> 0, grad L = -(beta / 2) * mean over pairs of (grad log p(chosen) - grad log p(rejected))."""
    adapter = copy.deepcopy(vlm_adapter)
    model = adapter.model
    batch = adapter.encode(pairs_of(preference_samples(easyvqa_samples)), train=True)
    with torch.no_grad():
        reference, _ = pair_logps(model, batch)
    beta = 1e-4
    logps, _ = pair_logps(model, batch)
    loss, _ = dpo_loss(*logps.chunk(2), *reference.chunk(2), DPOOptions(beta=beta))
    loss.backward()
    got = {k: v / beta for k, v in grads(model).items()}
    logps, _ = pair_logps(model, batch)
    chosen, rejected = logps.chunk(2)
    (-(chosen - rejected).mean() / 2).backward()
    expected = grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-3, msg=name)


def test_reference_with_lora_disabled_is_exactly_the_base_model(vlm_adapter, easyvqa_samples):
    from vlmkit.config import LoraSpec
    from vlmkit.train.objectives.common import adapter_disabled, lora_is_fresh, resolve_reference
    from vlmkit.train.peft import apply_lora

    base = copy.deepcopy(vlm_adapter)
    adapter = copy.deepcopy(vlm_adapter)
    batch = adapter.encode(pairs_of(preference_samples(easyvqa_samples)), train=True)
    base.model.eval()
    with torch.no_grad():
        expected, _ = pair_logps(base.model, batch)
    apply_lora(adapter, LoraSpec(r=4, dropout=0.0), quantized=False)
    adapter.model.eval()
    assert lora_is_fresh(adapter.model) and resolve_reference("auto", adapter.model, "dpo") == "adapter"
    with torch.no_grad():
        for name, parameter in adapter.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: the policy now differs from the base
        policy, _ = pair_logps(adapter.model, batch)
    assert not lora_is_fresh(adapter.model)
    with adapter_disabled(adapter.model):
        reference, _ = pair_logps(adapter.model, batch)
    assert not torch.allclose(policy, expected)
    assert torch.equal(reference, expected)


# -- GRPO ------------------------------------------------------------------------------------


def trl_grpo(model: nn.Module, batch: dict, prompt_length: int, advantages, options, old=None, ref=None):
    """TRL 1.x GRPOTrainer._compute_loss on one group: prompt and completion split at `prompt_length`."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    stub = types.SimpleNamespace(
        model=model,
        accelerator=StubAccelerator(),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=options.beta,
        loss_type=options.loss_type,
        epsilon_low=options.epsilon,
        epsilon_high=options.epsilon_high or options.epsilon,
        max_completion_length=options.max_new_tokens,
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
    )
    stub._get_per_token_logps_and_entropies = types.MethodType(
        GRPOTrainer._get_per_token_logps_and_entropies, stub
    )
    ids, attention = batch["input_ids"], batch["attention_mask"]
    completion_mask = (batch["labels"] != -100)[:, prompt_length:].long()
    inputs = {
        "prompt_ids": ids[:, :prompt_length],
        "prompt_mask": attention[:, :prompt_length],
        "completion_ids": ids[:, prompt_length:],
        "completion_mask": completion_mask,
        "advantages": advantages,
        # TRL takes one image per row; vlmkit's batch carries a repeated image once (image_index)
        "pixel_values": batch["pixel_values"][batch["image_index"]]
        if "image_index" in batch
        else batch["pixel_values"],
        "num_images": [1] * ids.size(0),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old[:, prompt_length - 1 :]
    if ref is not None:
        inputs["ref_per_token_logps"] = ref[:, prompt_length - 1 :]
    return GRPOTrainer._compute_loss(stub, model, inputs)


def group_batch(adapter, sample: Sample, answers: list[str]) -> tuple[dict, int]:
    """One prompt's group of completions encoded as GRPO encodes them; the prompt's length."""
    from vlmkit.data.sources.preference import with_answer

    batch = adapter.encode([with_answer(sample, a) for a in answers], train=True)
    labelled = (batch["labels"] != -100).long()
    starts = labelled.argmax(-1)
    assert torch.all(starts == starts[0])  # one prompt: completions start at one column
    return batch, int(starts[0])


@pytest.mark.parametrize(
    ("loss_type", "beta", "off_policy", "temperature"),
    [
        ("grpo", 0.0, False, 1.0),
        ("grpo", 0.04, True, 1.0),
        ("bnpo", 0.0, True, 1.0),
        ("dr_grpo", 0.04, False, 1.0),
        ("grpo", 0.04, True, 1.7),  # log-probs of the sampling distribution, as TRL's fused head
    ],
)
def test_grpo_loss_and_gradient_equal_trls(
    vlm_adapter, easyvqa_samples, loss_type, beta, off_policy, temperature
):
    from vlmkit.train.objectives.grpo import grpo_loss
    from vlmkit.train.objectives.options import GRPOOptions
    from vlmkit.train.objectives.rewards import group_advantages, score

    adapter = copy.deepcopy(vlm_adapter)
    model = adapter.model
    model.train()
    options = GRPOOptions(
        num_generations=4, loss_type=loss_type, beta=beta, epsilon_high=0.28, temperature=temperature
    )
    sample = easyvqa_samples[0]
    answers = [sample.answers[0], "blue", "yes yes", "circle"]
    rewards, _ = score(answers, [sample] * 4, options)
    advantages, _ = group_advantages(rewards, 4)
    batch, prompt_length = group_batch(adapter, sample, answers)
    with torch.no_grad():
        base, _ = token_logps(model, batch, temperature)
        old = base + 0.3 * torch.randn_like(base) if off_policy else None  # exercises the clipping
        ref = base + 0.5 * torch.randn_like(base) if beta else None
    per_token, mask = token_logps(model, batch, temperature)
    ours, _ = grpo_loss(per_token, per_token.detach() if old is None else old, advantages, mask, options, ref)
    ours.backward()
    our_grads = grads(model)
    theirs = trl_grpo(
        FusedVLM(copy.copy(model), temperature), batch, prompt_length, advantages, options, old, ref
    )
    theirs.backward()
    their_grads = grads(model)
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-5
    assert_same_grads(our_grads, their_grads)


def test_a_group_with_equal_rewards_contributes_no_policy_gradient(vlm_adapter, easyvqa_samples):
    from vlmkit.train.objectives.grpo import grpo_loss
    from vlmkit.train.objectives.options import GRPOOptions
    from vlmkit.train.objectives.rewards import group_advantages

    adapter = copy.deepcopy(vlm_adapter)
    options = GRPOOptions(num_generations=4)
    sample = easyvqa_samples[1]
    answers = ["red", "blue", "no", "green"]
    advantages, std = group_advantages(torch.tensor([0.0, 0.0, 0.0, 0.0]), 4)
    assert torch.all(advantages == 0) and torch.all(std == 0)
    batch, _ = group_batch(adapter, sample, answers)
    per_token, mask = token_logps(adapter.model, batch)
    loss, _ = grpo_loss(per_token, per_token.detach(), advantages, mask, options)
    loss.backward()
    gradients = grads(adapter.model)
    assert gradients and all(torch.count_nonzero(g) == 0 for g in gradients.values())
    # and a group whose rewards differ does move the policy
    advantages, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    per_token, mask = token_logps(adapter.model, batch)
    grpo_loss(per_token, per_token.detach(), advantages, mask, options)[0].backward()
    assert any(torch.count_nonzero(g) for g in grads(adapter.model).values())


def grpo_layer(adapter, options, answers: list[str]):
    """GRPO's loss layer without a Trainer around it, answering with `answers` instead of sampling."""
    from vlmkit.train.objectives.grpo import GRPOLoss

    layer = object.__new__(GRPOLoss)
    layer.adapter, layer.grpo, layer.reference, layer.reference_model = adapter, options, "none", None
    layer._objective_metrics = defaultdict(list)
    layer.sample_answers = lambda model, samples: list(answers)
    return layer


def test_skipping_zero_spread_groups_keeps_the_loss_of_the_groups_that_differ(vlm_adapter, easyvqa_samples):
    """DAPO's filter: a group whose answers all score alike is dropped before the forward pass; the
    loss and gradient are those of the remaining groups alone, and a round with none is a zero step."""
    from vlmkit.train.objectives.grpo import grpo_loss
    from vlmkit.train.objectives.options import GRPOOptions
    from vlmkit.train.objectives.rewards import group_advantages

    adapter = copy.deepcopy(vlm_adapter)
    model = adapter.model
    model.train()
    first, second = easyvqa_samples[1], easyvqa_samples[2]
    spread = [first.answers[0], "zz", "zz", "zz"]  # one right answer of four
    alike = ["zz"] * 4  # all wrong: no spread
    options = GRPOOptions(num_generations=4, max_new_tokens=3, skip_zero_spread_groups=True)
    encoded_rows: list[int] = []
    encode = adapter.encode
    adapter.encode = lambda samples, train=True: (
        encoded_rows.append(len(samples)) or encode(samples, train=train)
    )
    layer = grpo_layer(adapter, options, spread + alike)
    loss = layer.compute_loss(model, {"samples": [first, second]})
    loss.backward()
    ours = grads(model)
    assert encoded_rows == [4]  # the alike group never reached the model
    assert layer._objective_metrics["frac_reward_zero_std"] == [0.5]
    adapter.encode = encode
    advantages, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    batch, _ = group_batch(adapter, first, spread)
    per_token, mask = token_logps(model, batch, options.temperature)
    expected, _ = grpo_loss(per_token, per_token.detach(), advantages, mask, options)
    expected.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-6
    assert_same_grads(ours, grads(model))
    nothing = grpo_layer(adapter, options, alike + alike).compute_loss(model, {"samples": [first, second]})
    nothing.backward()
    assert float(nothing) == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads(model).values())


def test_skipping_zero_spread_groups_with_a_kl_term_is_refused():
    from pydantic import ValidationError

    from vlmkit.train.objectives.options import GRPOOptions

    with pytest.raises(ValidationError, match="set beta: 0 or skip_zero_spread_groups: false"):
        GRPOOptions(beta=0.1, skip_zero_spread_groups=True)


def test_guiding_puts_the_reference_into_groups_no_answer_of_which_scores_as_well(easyvqa_samples):
    """Off-policy guidance: only a group whose best answer scores below the reference gets it, in
    place of its last answer; a group with a right answer is left as sampled."""
    from vlmkit.data.sample import Sample
    from vlmkit.train.objectives.options import GRPOOptions
    from vlmkit.train.objectives.rewards import guided_answers

    first, second = easyvqa_samples[1], easyvqa_samples[2]
    options = GRPOOptions(num_generations=3, guide_with_reference=True)
    answers = ["zz", "zz", "zz", "zz", second.answers[0], "zz"]
    guided, count = guided_answers(answers, [first, second], options)
    assert count == 1
    assert guided == ["zz", "zz", first.answers[0], "zz", second.answers[0], "zz"]
    # partial credit (VQAv2 accuracy): 1 of 10 annotators is 0.3, the majority answer 1.0
    voted = Sample(id="v", image=None, messages=first.messages, answers=["two"] * 9 + ["three"])
    options = GRPOOptions(num_generations=2, rewards={"vqa_accuracy": 1.0})
    assert guided_answers(["three", "four"], [voted], options) == (["three", "two"], 1)


def test_a_guided_group_of_wrong_answers_moves_the_policy(vlm_adapter, easyvqa_samples):
    """All answers wrong: without guidance no gradient (and the group is dropped); with it the
    reference answer is the group's one right answer, so the policy moves towards it."""
    from vlmkit.train.objectives.options import GRPOOptions

    adapter = copy.deepcopy(vlm_adapter)
    model = adapter.model
    model.train()
    sample = easyvqa_samples[1]
    wrong = ["zz"] * 4
    plain = GRPOOptions(num_generations=4, max_new_tokens=3, skip_zero_spread_groups=True)
    grpo_layer(adapter, plain, wrong).compute_loss(model, {"samples": [sample]}).backward()
    assert all(torch.count_nonzero(g) == 0 for g in grads(model).values())
    guided = plain.model_copy(update={"guide_with_reference": True})
    layer = grpo_layer(adapter, guided, wrong)
    layer.compute_loss(model, {"samples": [sample]}).backward()
    assert any(torch.count_nonzero(g) for g in grads(model).values())
    assert layer._objective_metrics["frac_guided"] == [1.0]
    assert layer._objective_metrics["frac_reward_zero_std"] == [0.0]


def test_answer_log_probabilities_raise_no_deprecation_warning(vlm_adapter, easyvqa_samples):
    """The objectives read logits through the VLM's forward without labels; passing the LM an
    unused `past_key_values` made transformers 5.24+ warn on every DPO and GRPO step."""
    import warnings

    batch = vlm_adapter.encode(easyvqa_samples[:2], train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        per_token, mask = token_logps(vlm_adapter.model, batch)
    assert per_token.shape == mask.shape and bool(mask.any())
