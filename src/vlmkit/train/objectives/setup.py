"""Which Trainer class, collator and options a stage's `objective` trains with (runner's dispatch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmkit.config import RunConfig, Stage
from vlmkit.data.sample import Sample
from vlmkit.data.sources.preference import rejected_of
from vlmkit.errors import DataError
from vlmkit.models.adapters.base import ModelAdapter
from vlmkit.train.collate import BadSampleLog, Collator
from vlmkit.train.trainer import VlmkitTrainer


def objective_parts(
    adapter: ModelAdapter,
    config: RunConfig,
    stage: Stage,
    samples: Sequence[Sample],
    bad_samples: BadSampleLog,
) -> tuple[type[VlmkitTrainer], dict[str, Any], Any]:
    """(trainer class, its extra keyword arguments, data collator) for the stage's objective.

    Data problems an objective cannot train on (a pair without a rejected answer, a prompt without
    reference answers) stop here, before any step, naming the first sample.
    """
    on_bad = config.data.on_bad_sample
    where = f"stage {stage.name}" if config.stages else "data.train"
    if stage.objective == "dpo":
        from vlmkit.train.objectives.common import resolve_reference
        from vlmkit.train.objectives.dpo import DPOTrainer, PreferenceCollator, cache_reference

        options = stage.dpo
        assert options is not None
        for sample in samples:
            try:
                rejected_of(sample)
            except DataError as error:
                raise DataError(f"{where}: {error}") from None
        reference = resolve_reference(options.reference, adapter.model, "dpo")
        cache = (
            cache_reference(adapter, samples, options.reference_batch_size) if reference == "cached" else None
        )
        collator = PreferenceCollator(adapter, on_bad, bad_samples, reference=cache)
        return DPOTrainer, {"dpo": options, "reference": reference}, collator
    if stage.objective == "grpo":
        from vlmkit.train.objectives.common import frozen_copy, resolve_reference
        from vlmkit.train.objectives.grpo import GRPOTrainer, PromptCollator
        from vlmkit.train.objectives.rewards import check_references

        options = stage.grpo
        assert options is not None
        check_references(samples, where)
        reference = resolve_reference(options.reference, adapter.model, "grpo", needed=options.beta > 0)
        kwargs: dict[str, Any] = {"adapter": adapter, "grpo": options, "reference": reference}
        if reference == "copy":
            kwargs["reference_model"] = frozen_copy(adapter.model)
        return GRPOTrainer, kwargs, PromptCollator()
    return VlmkitTrainer, {}, Collator(adapter, on_bad, bad_samples)
