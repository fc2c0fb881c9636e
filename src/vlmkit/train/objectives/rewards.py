"""GRPO's rewards: named official metrics against each sample's reference answers, plus an optional
format reward, weighted and summed. Scoring is the metrics' own code (vlmkit.eval.metrics), so a
reward of 1.0 means exactly what a test-set score of 100% means."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from vlmkit.data.sample import Sample
from vlmkit.errors import DataError
from vlmkit.eval.metrics import get_metric
from vlmkit.train.objectives.options import GRPOOptions


def check_references(samples: Sequence[Sample], where: str) -> None:
    """Every GRPO prompt needs reference answers to be scored against; name the first that has none."""
    for sample in samples:
        if not sample.answers:
            raise DataError(
                f"sample {sample.id!r} of {where} has no reference answers; GRPO's rewards score answers "
                "against them: use a VQA source with answers (e.g. easyvqa:train, vqav2, docvqa)"
            )


def score(
    completions: Sequence[str], samples: Sequence[Sample], options: GRPOOptions
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total reward per completion, each reward function's unweighted scores)."""
    per_function: dict[str, torch.Tensor] = {}
    total = torch.zeros(len(completions))
    for name, weight in options.rewards.items():
        metric = get_metric(name)
        values = torch.tensor(
            [metric(text, sample.answers) for text, sample in zip(completions, samples, strict=True)]
        )
        per_function[name] = values
        total += weight * values
    if options.format is not None:
        pattern = re.compile(options.format.pattern)
        values = torch.tensor([float(pattern.fullmatch(text) is not None) for text in completions])
        per_function["format"] = values
        total += options.format.weight * values
    return total, per_function


def guided_answers(
    answers: Sequence[str], samples: Sequence[Sample], options: GRPOOptions
) -> tuple[list[str], int]:
    """(the answers, with the reference in place of the last answer of each group in which no
    answer scores as well as the reference; how many groups that was). Groups are contiguous."""
    group = options.num_generations
    rows = [sample for sample in samples for _ in range(group)]
    sampled, _ = score(answers, rows, options)
    references = [sample.answers[0] for sample in samples]
    best, _ = score(references, samples, options)
    guided = list(answers)
    count = 0
    for g in range(len(samples)):
        if float(sampled[g * group : (g + 1) * group].max()) < float(best[g]):
            guided[(g + 1) * group - 1] = references[g]
            count += 1
    return guided, count


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each completion, reward std of its group): reward minus its group's mean,
    divided by the group's (or batch's) std + 1e-4 as in TRL; `none` leaves it unscaled (Dr. GRPO)."""
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    group_std = grouped.std(dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + 1e-4)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages, group_std
