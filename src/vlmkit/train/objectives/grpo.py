"""GRPO on vlmkit's Trainer: sample `num_generations` answers per prompt with `adapter.generate`,
score them with the official metrics, and take a clipped policy-gradient step on group-relative
advantages. Each step is one generation round (TRL's `num_iterations: 1`, on-policy), so the ratio
to the sampling policy is 1 in value and only its gradient acts; clipping bites only if a
subclass reuses completions. tests/test_objectives.py proves the loss equals TRL's `_compute_loss`.

Sampled answers are decoded and re-encoded through `adapter.encode`, so the log-probabilities are
read at the same positions SFT trains (the answer tokens and the end-of-turn token).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from vlmkit.data.sample import Sample
from vlmkit.data.sources.preference import with_answer
from vlmkit.models.adapters.base import ModelAdapter
from vlmkit.train.objectives.common import adapter_disabled, token_logps
from vlmkit.train.objectives.options import GRPOOptions
from vlmkit.train.objectives.rewards import group_advantages, guided_answers, score
from vlmkit.train.trainer import VlmkitTrainer

logger = logging.getLogger(__name__)

#: A group whose reward spread is below this has no advantage to learn from.
NO_SPREAD = 1e-8


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: GRPOOptions,
    ref_per_token_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate -min(r A, clip(r, 1-ε, 1+ε_high) A) per completion token, plus
    beta * k3 KL estimate exp(ref - logp) - (ref - logp) - 1 to the reference, aggregated by
    `loss_type` (grpo: per-sequence token mean, then mean; bnpo: token mean; dr_grpo: / (N x L))."""
    mask = mask.to(per_token_logps.dtype)
    ratio = torch.exp(per_token_logps - old_per_token_logps)
    high = options.epsilon_high if options.epsilon_high is not None else options.epsilon
    clipped = torch.clamp(ratio, 1 - options.epsilon, 1 + high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if options.beta:
        if ref_per_token_logps is None:
            raise ValueError("grpo.beta > 0 needs the reference log-probabilities")
        gap = ref_per_token_logps - per_token_logps
        kl = torch.exp(gap) - gap - 1
        per_token = per_token + options.beta * kl
        stats["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    if options.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif options.loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (per_token.size(0) * options.max_new_tokens)
    low_clip = ((ratio < 1 - options.epsilon) & (adv < 0)).float()
    high_clip = ((ratio > 1 + high) & (adv > 0)).float()
    stats["clip_ratio"] = (((low_clip + high_clip) * mask).sum() / mask.sum().clamp(min=1)).detach()
    return loss, stats


def expand(samples: Sequence[Sample], num_generations: int) -> list[Sample]:
    """Each prompt repeated `num_generations` times, groups contiguous (rows g*G .. g*G+G-1)."""
    return [sample for sample in samples for _ in range(num_generations)]


class PromptCollator:
    """GRPO batches are prompts: the samples go to the trainer as they are (it generates)."""

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        return {"samples": samples, "sample_ids": [sample.id for sample in samples]}


class GRPOLoss(Trainer):
    """The GRPO objective as a Trainer layer; `VlmkitTrainer` stacks on top (guards, checkpoints)."""

    def __init__(
        self,
        *args: Any,
        adapter: ModelAdapter,
        grpo: GRPOOptions,
        reference: str,
        reference_model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.adapter = adapter
        self.grpo = grpo
        self.reference = reference
        self.reference_model = reference_model
        self.model_accepts_loss_kwargs = False  # a mean per step: Trainer scales for accumulation
        self._objective_metrics: dict[str, list[float]] = defaultdict(list)

    def sample_answers(self, model: nn.Module, samples: list[Sample]) -> list[str]:
        """`num_generations` sampled answers per prompt, in the model's eval mode, then back to train.

        Each prompt is encoded (and its image seen by the tower) once; `generate` expands it to
        `num_generations` rows (`num_return_sequences`), laid out as `expand` lays out the groups.
        """
        options = self.grpo
        step = options.generation_batch_size or len(samples)
        answers: list[str] = []
        try:
            for start in range(0, len(samples), step):
                answers += self.adapter.generate(
                    samples[start : start + step],
                    max_new_tokens=options.max_new_tokens,
                    do_sample=True,
                    temperature=options.temperature,
                    top_p=options.top_p,
                    generation_options={"num_return_sequences": options.num_generations},
                )
        finally:
            model.train()
        if len(answers) != len(samples) * options.num_generations:
            raise RuntimeError(
                f"grpo: generate returned {len(answers)} answers for {len(samples)} prompts x "
                f"{options.num_generations} generations; the adapter must honour num_return_sequences"
            )
        return answers

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        options = self.grpo
        samples: list[Sample] = inputs["samples"]
        answers = self.sample_answers(model, samples)
        if options.guide_with_reference:
            answers, guided = guided_answers(answers, samples, options)
            self._objective_metrics["frac_guided"].append(guided / len(samples))
        rows = expand(samples, options.num_generations)
        rewards, per_function = score(answers, rows, options)
        advantages, group_std = group_advantages(rewards, options.num_generations, options.scale_rewards)
        groups = group_std.view(-1, options.num_generations)[:, 0]
        self._log_rewards(rewards, per_function, groups)
        keep = list(range(len(rows)))
        if options.skip_zero_spread_groups:
            keep = [i for i in keep if group_std[i].abs() >= NO_SPREAD]
            if not keep:  # nothing to learn from this round: a zero loss on the graph
                zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
                return (zero, {"answers": answers}) if return_outputs else zero
            advantages = advantages[keep]
        encoded = self.adapter.encode([with_answer(rows[i], answers[i]) for i in keep], train=True)
        batch = {k: v.to(self.adapter.device) for k, v in encoded.items()}
        temperature = options.temperature  # the policy that sampled the answers
        per_token, mask = token_logps(model, batch, temperature)
        reference = None
        if self.reference == "adapter":
            with adapter_disabled(self.accelerator.unwrap_model(model)):
                reference, _ = token_logps(model, batch, temperature)
        elif self.reference == "copy" and self.reference_model is not None:
            with torch.no_grad():
                reference, _ = token_logps(self.reference_model, batch, temperature)
        loss, stats = grpo_loss(
            per_token, per_token.detach(), advantages.to(per_token.device), mask, options, reference
        )
        metrics = self._objective_metrics
        metrics["completions/mean_length"].append(float(mask.sum(-1).float().mean()))
        for name, value in stats.items():
            metrics[name].append(float(value))
        return (loss, {"answers": answers}) if return_outputs else loss

    def _log_rewards(
        self, rewards: torch.Tensor, per_function: dict[str, torch.Tensor], groups: torch.Tensor
    ) -> None:
        """Reward means, spread within groups, and the share of groups without spread (TRL's names)."""
        metrics = self._objective_metrics
        for name, values in per_function.items():
            metrics[f"rewards/{name}/mean"].append(float(values.mean()))
        metrics["reward"].append(float(rewards.mean()))
        metrics["reward_std"].append(float(groups.mean()))
        metrics["frac_reward_zero_std"].append(float((groups.abs() < NO_SPREAD).float().mean()))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the means of the objective's metrics since the last log (TRL's names)."""
        if "loss" in logs and self._objective_metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._objective_metrics.items()})
            self._objective_metrics.clear()
        super().log(logs, *args, **kwargs)


class GRPOTrainer(VlmkitTrainer, GRPOLoss):
    """vlmkit's Trainer (guards, atomic checkpoints, batching) with the GRPO loss."""
