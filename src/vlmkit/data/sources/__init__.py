"""Dataset sources: each turns a dataset on disk into a list of Samples.

A source is one function registered by name; `load_samples("easyvqa:test")` finds it. Nothing
after a source knows which dataset a Sample came from.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlmkit.data.conversations import merge_turns
from vlmkit.data.sample import Sample
from vlmkit.errors import DataError

SourceFn = Callable[..., list[Sample]]
_SOURCES: dict[str, SourceFn] = {}
_EVAL_DEFAULTS: dict[str, dict[str, Any]] = {}

SHORT_ANSWER = " Answer the question using a single word or phrase."


def register_source(
    name: str,
    default_metric: str = "exact_match",
    prompt_suffix: str = "",
    max_new_tokens: int = 16,
) -> Callable[[SourceFn], SourceFn]:
    """Register a source under `name` with how `vlmkit eval` scores it by default: the metric,
    the instruction appended to each question, and the answer length budget."""

    def wrap(fn: SourceFn) -> SourceFn:
        _SOURCES[name] = fn
        _EVAL_DEFAULTS[name] = {
            "metric": default_metric,
            "prompt_suffix": prompt_suffix,
            "max_new_tokens": max_new_tokens,
        }
        return fn

    return wrap


class DataSpec(BaseModel):
    """Which samples to read: `easyvqa:test` or a mapping with the same fields."""

    model_config = ConfigDict(extra="forbid")

    source: str
    split: str = "train"
    path: str | None = None
    limit: int | None = Field(default=None, ge=1)  # the first N, in source order
    count: int | None = Field(default=None, ge=1)  # N drawn at random with `seed`
    fraction: float | None = Field(default=None, gt=0, le=1)
    seed: int = 0
    # Keep only samples whose `meta[key]` is one of the listed values, e.g. a curriculum stage
    # on `{question_type: [shape, color]}`; applied before fraction/count/limit.
    where: dict[str, list[Any]] = Field(default_factory=dict)
    # Merge the questions about one image into conversations of up to this many turns (applied
    # last): the image tokens are paid once per conversation (vlmkit.data.conversations).
    turns_per_image: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            source, _, split = value.partition(":")
            return {"source": source, "split": split or "train"}
        return value

    def __str__(self) -> str:
        return f"{self.source}:{self.split}"


def available_sources() -> list[str]:
    _import_builtin_sources()
    return sorted(_SOURCES)


def eval_defaults(source: str | None) -> dict[str, Any]:
    """The metric, prompt suffix and max_new_tokens a source is scored with unless told otherwise."""
    _import_builtin_sources()
    return dict(
        _EVAL_DEFAULTS.get(source or "", {"metric": "exact_match", "prompt_suffix": "", "max_new_tokens": 16})
    )


def default_metric(source: str) -> str:
    return eval_defaults(source)["metric"]


def load_samples(spec: DataSpec | str | dict[str, Any]) -> list[Sample]:
    """Read a source, then subsample by fraction and/or count with a fixed seed."""
    spec = spec if isinstance(spec, DataSpec) else DataSpec.model_validate(spec)
    _import_builtin_sources()
    if spec.source not in _SOURCES:
        raise DataError(f"unknown data source {spec.source!r}; choose one of: {', '.join(sorted(_SOURCES))}")
    kwargs = dict(spec.options)
    if spec.path is not None:
        kwargs["path"] = spec.path
    samples = _SOURCES[spec.source](split=spec.split, **kwargs)
    if spec.where:
        samples = _matching(samples, spec)
    if spec.fraction is not None:
        keep = max(1, round(len(samples) * spec.fraction))
        samples = _seeded_subset(samples, keep, spec.seed)
    if spec.count is not None and spec.count < len(samples):
        samples = _seeded_subset(samples, spec.count, spec.seed)
    if spec.limit is not None:
        samples = samples[: spec.limit]
    if spec.turns_per_image is not None:
        samples = merge_turns(samples, spec.turns_per_image, spec.seed)
    if not samples:
        raise DataError(f"data source {spec} is empty; check its path and split")
    return samples


def _matching(samples: list[Sample], spec: DataSpec) -> list[Sample]:
    kept = [s for s in samples if all(s.meta.get(key) in values for key, values in spec.where.items())]
    if samples and not kept:
        seen = {key: sorted({str(s.meta.get(key)) for s in samples[:10_000]}) for key in spec.where}
        raise DataError(f"no sample of {spec} matches where={spec.where}; values present: {seen}")
    return kept


def _seeded_subset(samples: list[Sample], count: int, seed: int) -> list[Sample]:
    indices = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [samples[i] for i in indices]


def _import_builtin_sources() -> None:
    # Imported lazily so that registering never costs the CLI's start-up.
    from vlmkit.data.sources import (  # noqa: F401
        captions,
        chartqa,
        docvqa,
        easyvqa,
        jsonl,
        llava_json,
        preference,
        vqav2,
    )
