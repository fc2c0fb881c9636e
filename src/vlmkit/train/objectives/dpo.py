"""DPO on vlmkit's Trainer: each batch is B chosen rows then B rejected rows from `adapter.encode`.

TRL's DPOTrainer tokenises its own dataset columns with a processor and patches a fused LM head
onto a transformers causal LM; vlmkit's batches come from adapters (its own VLM composes image
tokens itself), so the objective is implemented here and tests/test_objectives.py proves it
computes TRL's loss on the same model and batch (to 1e-5).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from vlmkit.data.sample import Sample
from vlmkit.data.sources.preference import rejected_of, with_answer
from vlmkit.errors import DataError, SampleError
from vlmkit.models.adapters.base import Batch, ModelAdapter
from vlmkit.train.collate import Collator
from vlmkit.train.objectives.common import adapter_disabled, token_logps
from vlmkit.train.objectives.options import DPOOptions
from vlmkit.train.trainer import VlmkitTrainer

logger = logging.getLogger(__name__)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    options: DPOOptions,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss over pairs and the implicit rewards `beta * (logp - ref_logp)`.

    sigmoid: -log σ(β Δ), with cDPO label smoothing ε: -(1-ε) log σ(β Δ) - ε log σ(-β Δ);
    ipo: (Δ' - 1/(2β))², Δ' from log-ratios averaged per answer token (as TRL, with IPO's authors);
    plus `sft_weight` × the mean NLL per chosen answer token (TRL's "sft" loss type).
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    beta = options.beta
    if options.loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs each answer's token count")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        logits = beta * (chosen_ratio - rejected_ratio)
        smoothing = options.label_smoothing
        losses = -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    stats = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    loss = losses.mean()
    if options.sft_weight:
        if chosen_tokens is None:
            raise ValueError("dpo.sft_weight needs each answer's token count")
        nll = -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
        loss = loss + options.sft_weight * nll
        stats["nll/chosen"] = nll.detach()
    return loss, stats


def pair_logps(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probabilities of every row, answer token counts); rows = chosen + rejected."""
    per_token, mask = token_logps(model, batch)
    return per_token.sum(-1), mask.sum(-1)


def pairs_of(samples: Sequence[Sample]) -> list[Sample]:
    """The chosen rows then the rejected rows of a batch of preference Samples."""
    rejected = [with_answer(sample, rejected_of(sample)) for sample in samples]
    chosen = [with_answer(sample, sample.messages[-1]["content"]) for sample in samples]  # type: ignore[arg-type]
    return chosen + rejected


class PreferenceCollator(Collator):
    """Encodes each pair as a chosen and a rejected row (same prompt and image, same label masks as
    SFT); attaches cached reference log-probabilities when there are any. A pair with a bad row is
    skipped whole (recorded in bad_samples.jsonl) or fails the run, as `data.on_bad_sample` says."""

    def __init__(
        self, *args: Any, reference: dict[str, tuple[float, float]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference

    def __call__(self, samples: list[Sample]) -> Batch:
        good = samples
        try:
            batch = self.adapter.encode(pairs_of(samples), train=True)
        except SampleError as first_error:
            if self.on_bad_sample == "fail":
                raise DataError(
                    f"{first_error} (or set data.on_bad_sample: skip to skip and count such samples)"
                ) from None
            good = []
            for sample in samples:
                try:
                    self.adapter.encode(pairs_of([sample]), train=True)
                except SampleError as error:
                    logger.warning("skipping %s", error)
                    self.bad_samples.record(error)
                else:
                    good.append(sample)
            if not good:
                raise DataError(
                    f"every pair of a batch was bad (see {self.bad_samples.path}); check the data source"
                ) from None
            batch = self.adapter.encode(pairs_of(good), train=True)
        batch["sample_ids"] = [sample.id for sample in good]  # type: ignore[assignment]
        if self.reference is not None:
            chosen = [self.reference[sample.id][0] for sample in good]
            rejected = [self.reference[sample.id][1] for sample in good]
            batch["ref_logps"] = torch.tensor(chosen + rejected, dtype=torch.float32)
        return batch


@torch.no_grad()
def cache_reference(
    adapter: ModelAdapter, samples: Sequence[Sample], batch_size: int
) -> dict[str, tuple[float, float]]:
    """Every pair's reference log-probabilities (chosen, rejected), from the model before training:
    the reference DPO needs without a second copy of the weights."""
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DataError(
            f"preference sample id {duplicate!r} appears twice; cached reference log-probabilities are "
            "kept by id, so give every record a unique id"
        )
    model = adapter.model
    was_training = model.training
    model.eval()
    cache: dict[str, tuple[float, float]] = {}
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = {k: v.to(adapter.device) for k, v in adapter.encode(pairs_of(chunk), train=True).items()}
            logps, _ = pair_logps(model, batch)
            chosen, rejected = logps.chunk(2)
            for sample, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                cache[sample.id] = (c, r)
    finally:
        model.train(was_training)
    logger.info("cached reference log-probabilities of %d preference pairs", len(cache))
    return cache


class DPOLoss(Trainer):
    """The DPO objective as a Trainer layer; `VlmkitTrainer` stacks on top (guards, checkpoints)."""

    def __init__(self, *args: Any, dpo: DPOOptions, reference: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dpo = dpo
        self.reference = reference
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs: Trainer scales accumulation
        self._objective_metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        ref_logps = inputs.pop("ref_logps", None)
        logps, tokens = pair_logps(model, inputs)
        if self.reference == "adapter":
            with adapter_disabled(self.accelerator.unwrap_model(model)):
                ref_logps, _ = pair_logps(model, inputs)
        if ref_logps is None:
            raise ValueError("DPO needs reference log-probabilities (cached or from the disabled adapter)")
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.to(logps.device).chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        loss, stats = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.dpo, chosen_tokens, rejected_tokens
        )
        for name, value in stats.items():
            self._objective_metrics[name].append(float(value))
        return (loss, {"logps": logps}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the means of the objective's metrics since the last log (TRL's names)."""
        if "loss" in logs and self._objective_metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._objective_metrics.items()})
            self._objective_metrics.clear()
        super().log(logs, *args, **kwargs)


class DPOTrainer(VlmkitTrainer, DPOLoss):
    """vlmkit's Trainer (guards, atomic checkpoints, batching) with the DPO loss."""
