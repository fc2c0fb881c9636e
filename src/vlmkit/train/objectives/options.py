"""Objective options (`objective: sft | dpo | grpo` and the `dpo:` / `grpo:` sections): pydantic only.

Field names and defaults follow TRL's DPOConfig / GRPOConfig where the two mean the same thing,
so a TRL recipe's numbers carry over; docs/recipes.md ("Preference and RL fine-tuning") explains each.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Objective = Literal["sft", "dpo", "grpo"]
#: Reward functions GRPO can use: the official metrics of vlmkit.eval.metrics, scored per answer.
REWARD_NAMES = ("exact_match", "vqa_accuracy", "anls", "relaxed_accuracy")
#: Where the reference policy comes from: `adapter` = the base with LoRA disabled, `cached` = the
#: model's log-probabilities computed once before training (DPO), `copy` = a frozen copy.
Reference = Literal["auto", "adapter", "cached", "copy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DPOOptions(_Strict):
    """Direct preference optimisation (Rafailov et al.): sigmoid loss, or IPO's squared loss."""

    beta: float = Field(default=0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # Conservative DPO / cDPO: the probability that a pair's preference label is flipped.
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    # Weight of a supervised term, the mean NLL of the chosen answers' tokens, added to the loss
    # (RPO, Pang et al. 2024; TRL: loss_type [sigmoid, sft], loss_weights [1, sft_weight]). It keeps
    # DPO from lowering the chosen answers' likelihood along with the rejected ones, which
    # one-word answers suffer from (docs/recipes.md).
    sft_weight: float = Field(default=0.0, ge=0)
    reference: Reference = "auto"
    # Batch size of the pass that computes the cached reference log-probabilities.
    reference_batch_size: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _compatible(self) -> DPOOptions:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("dpo.label_smoothing applies to the sigmoid loss; remove it for loss: ipo")
        if self.reference == "copy":
            raise ValueError(
                "dpo.reference: copy is not needed: DPO's reference log-probabilities are cached once "
                "before training; use cached, adapter (LoRA) or auto"
            )
        return self


class FormatReward(_Strict):
    """A reward of 1 for an answer that matches `pattern` in full (Python regex), else 0."""

    pattern: str
    weight: float = 0.1

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"grpo.format.pattern {value!r} is not a valid regex ({exc})") from None
        return value


class GRPOOptions(_Strict):
    """Group relative policy optimisation with the official metrics as verifiable rewards."""

    num_generations: int = 4
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=16, ge=1)
    # Reward name -> weight; the weighted sum is each answer's reward.
    rewards: dict[str, float] = Field(default_factory=lambda: {"exact_match": 1.0})
    format: FormatReward | None = None
    # KL coefficient to the reference policy; 0 (TRL's default) needs no reference at all.
    beta: float = Field(default=0.0, ge=0)
    epsilon: float = Field(default=0.2, gt=0)
    epsilon_high: float | None = Field(default=None, gt=0)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # grpo: mean over each completion's tokens, then over completions; bnpo: mean over all tokens
    # of the batch; dr_grpo: sum over tokens / (completions x max_new_tokens).
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    reference: Reference = "auto"
    # Prompts per generate call (each expands to num_generations rows); None: all at once.
    generation_batch_size: int | None = Field(default=None, ge=1)
    # DAPO's dynamic-sampling filter: a group whose rewards are all equal has zero advantage, so
    # (with beta 0) no policy gradient; true drops such groups before the forward pass, and the
    # step's loss is the mean over the groups that differ (all equal: a zero step).
    skip_zero_spread_groups: bool = False
    # Off-policy guidance (as LUFFY): a group none of whose answers scores as well as the sample's
    # first reference answer gets that answer in place of its last one, so a confident mistake the
    # policy never samples its way out of still has an answer to learn from.
    guide_with_reference: bool = False

    @field_validator("num_generations")
    @classmethod
    def _group(cls, value: int) -> int:
        if value < 2:
            raise ValueError(
                f"grpo.num_generations is {value}: a group needs at least 2 answers to compare "
                "(advantages are relative to the group); set it to 2 or more, e.g. 4"
            )
        return value

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError(f"grpo.rewards is empty; name at least one of {', '.join(REWARD_NAMES)}")
        unknown = [name for name in value if name not in REWARD_NAMES]
        if unknown:
            raise ValueError(
                f"grpo.rewards: unknown reward {unknown[0]!r}; choose from {', '.join(REWARD_NAMES)}"
            )
        return value

    @model_validator(mode="after")
    def _reference(self) -> GRPOOptions:
        if self.skip_zero_spread_groups and self.beta:
            raise ValueError(
                "grpo.skip_zero_spread_groups would drop groups whose KL term (beta > 0) still has a "
                "gradient; set beta: 0 or skip_zero_spread_groups: false"
            )
        if self.reference == "cached":
            raise ValueError(
                "grpo.reference: cached cannot work: GRPO scores new answers every step; "
                "use adapter (LoRA), copy, or auto"
            )
        return self
