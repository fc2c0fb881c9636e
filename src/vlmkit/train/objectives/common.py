"""What DPO and GRPO share: per-token log-probabilities of labelled tokens, and the reference policy.

Log-probabilities are read at exactly the positions SFT's loss trains (the adapter's `labels`
from `encode(..., train=True)`), so the two objectives use the same label masks as SFT in every
family. The model is called without labels (its plain forward returns logits); only labelled rows
are taken through log-softmax, in float32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.models.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: batch keys that are not model inputs (the trainer and collators add them).
NON_MODEL_KEYS = frozenset({"labels", "sample_ids", "image_keys", "ref_logps"})


def token_logps(
    model: nn.Module, batch: dict[str, Any], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each next token, mask of labelled next tokens), both (rows, length - 1).

    Unlabelled positions hold 0, so `.sum(-1)` is a sequence's log-probability over its answer.
    `temperature` divides the logits first: GRPO's policy is the distribution it sampled from
    (TRL puts the same temperature into its fused LM head).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    logits = model(**inputs, use_cache=False).logits
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = logits[:, :-1][mask].float()  # (labelled tokens, vocab)
    if temperature != 1.0:
        rows = rows / temperature
    picked = rows.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    return picked.new_zeros(mask.shape).masked_scatter(mask, picked), mask


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is in the train extra
        return False
    return isinstance(model, PeftModel)


def lora_is_fresh(model: nn.Module) -> bool:
    """Whether every LoRA `B` matrix is still zero (as peft initialises it): then the base with the
    adapter disabled is exactly the current policy, the reference DPO and GRPO start from."""
    found = False
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            found = True
            if parameter.detach().abs().max() > 0:
                return False
    return found


def resolve_reference(choice: str, model: nn.Module, objective: str, needed: bool = True) -> str:
    """The reference policy to use: `adapter`, `cached`, `copy`, or `none` (GRPO with beta 0).

    `auto` picks the base with LoRA disabled when that *is* the starting policy (a fresh adapter),
    else cached log-probabilities (DPO); GRPO's KL term then needs an explicit `copy`.
    """
    if not needed:
        return "none"
    if choice == "adapter":
        if not is_peft(model):
            raise ConfigError(
                f"{objective}.reference: adapter needs a LoRA model (model.lora); use "
                f"{'cached' if objective == 'dpo' else 'copy'} for a fully trained model"
            )
        if not lora_is_fresh(model):
            logger.warning(
                "%s.reference: adapter: the LoRA weights were trained before, so the reference is the base "
                "model without them, not the model this stage starts from",
                objective,
            )
        return "adapter"
    if choice != "auto":
        return choice
    if is_peft(model) and lora_is_fresh(model):
        return "adapter"
    if objective == "dpo":
        return "cached"
    raise ConfigError(
        "grpo.beta > 0 needs a reference policy: set grpo.reference: copy (a frozen copy of the model, "
        "twice the weights' memory), use a fresh model.lora (reference = adapter disabled), or set grpo.beta: 0"
    )


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's forward: LoRA adapters off (peft's own switch), no gradient."""
    with torch.no_grad(), model.disable_adapter():
        yield


def frozen_copy(model: nn.Module) -> nn.Module:
    """A reference policy that keeps the starting weights while the policy trains (GRPO `copy`)."""
    reference = copy.deepcopy(model)
    reference.eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference
