"""Dataset sources: each turns a dataset on disk into a list of Samples.

A source is one function registered by name; `load_samples("easyvqa:test")` finds it. Nothing
after a source knows which dataset a Sample came from.
"""

from __future__ import annotations

import difflib
import inspect
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlmkit.data.conversations import merge_turns
from vlmkit.data.sample import Sample
from vlmkit.errors import DataError

SourceFn = Callable[..., list[Sample]]
StreamFn = Callable[..., Iterator[Sample]]
_SOURCES: dict[str, SourceFn] = {}
_STREAMS: dict[str, StreamFn] = {}
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


def register_stream(name: str) -> Callable[[StreamFn], StreamFn]:
    """Register a lazy reader for source `name` (same arguments as the source): `iter_samples`
    uses it so that data too large for memory (webdataset shards) is read a batch at a time."""

    def wrap(fn: StreamFn) -> StreamFn:
        _STREAMS[name] = fn
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

    @model_validator(mode="after")
    def _check_options(self) -> DataSpec:
        """An unknown source, or an option the source does not take, fails here, at config load,
        listing the valid ones."""
        problem = unknown_source(self.source)
        if problem:
            raise ValueError(problem)
        check_options(self.source, self.options)
        return self

    def __str__(self) -> str:
        # A single-file source (llava_json: test.json) with no split given is named after its file.
        if "split" not in self.model_fields_set and self.path and Path(self.path).is_file():
            return f"{self.source}:{Path(self.path).stem}"
        return f"{self.source}:{self.split}"


def data_spec(
    value: DataSpec | str | dict[str, Any],
    *,
    path: str | None = None,
    options: dict[str, Any] | None = None,
) -> DataSpec:
    """A DataSpec from a string or mapping (plus a path and options, as the CLI passes them);
    a bad one is a one-line DataError naming the field."""
    raw: Any = value.model_dump(exclude_unset=True) if isinstance(value, DataSpec) else value
    if isinstance(raw, str):
        source, _, split = raw.partition(":")
        raw = {"source": source, "split": split} if split else {"source": source}
    raw = dict(raw)
    if path is not None:
        raw["path"] = path
    if options:
        raw["options"] = {**raw.get("options", {}), **options}
    try:
        return DataSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "data"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown field; a data spec takes {', '.join(DataSpec.model_fields)}"
        raise DataError(f"data spec {where}: {message}") from None


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """`--data-option key=value` pairs; values are JSON where they parse (true, 3, [..]), else text."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--data-option {item!r} is not KEY=VALUE (e.g. image_folder=/data/coco)")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    return options


def source_options(source: str) -> list[str] | None:
    """The options a registered source takes (None: unknown source, or one that takes any)."""
    _import_builtin_sources()
    fn = _SOURCES.get(source)
    if fn is None:
        return None
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.name not in ("split", "path")]


def check_options(source: str, options: dict[str, Any]) -> None:
    """Refuse options a source does not take, in one line that lists the valid ones."""
    valid = source_options(source)
    if valid is None:
        return
    if "path" in options or "split" in options:
        raise ValueError(f"data.path and data.split are fields of the data spec, not {source} options")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{source} takes no option {', '.join(map(repr, unknown))}; its options are: "
            f"{', '.join(valid) or 'none'}"
        )


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


def unknown_source(name: str) -> str | None:
    """Why `name` is not a registered source (with the closest one), or None when it is."""
    _import_builtin_sources()
    if name in _SOURCES:
        return None
    close = difflib.get_close_matches(name, _SOURCES, 1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown data source {name!r}{hint}; choose one of: {', '.join(sorted(_SOURCES))}"


def _source_call(spec: DataSpec) -> tuple[str, dict[str, Any]]:
    problem = unknown_source(spec.source)
    if problem:
        raise DataError(problem)
    kwargs = dict(spec.options)
    if spec.path is not None:
        kwargs["path"] = spec.path
    return spec.source, kwargs


def load_samples(spec: DataSpec | str | dict[str, Any]) -> list[Sample]:
    """Read a source, then subsample by fraction and/or count with a fixed seed."""
    spec = spec if isinstance(spec, DataSpec) else data_spec(spec)
    source, kwargs = _source_call(spec)
    samples = _SOURCES[source](split=spec.split, **kwargs)
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


def is_streamed(spec: DataSpec) -> bool:
    """Whether `iter_samples(spec)` reads lazily rather than loading the whole source first."""
    _import_builtin_sources()
    whole = spec.fraction is not None or spec.count is not None or spec.turns_per_image is not None
    return spec.source in _STREAMS and not whole


def iter_samples(spec: DataSpec | str | dict[str, Any]) -> Iterator[Sample]:
    """The samples of `spec` one at a time, in source order.

    A source with a lazy reader (webdataset shards) is streamed, `where` and `limit` applied on
    the way, so only what the consumer holds is in memory. What needs every sample first
    (`fraction`, `count`, `turns_per_image`) and sources without a lazy reader go through
    `load_samples`.
    """
    spec = spec if isinstance(spec, DataSpec) else data_spec(spec)
    source, kwargs = _source_call(spec)
    if not is_streamed(spec):
        yield from load_samples(spec)
        return
    read = kept = 0
    seen: dict[str, set[str]] = {key: set() for key in spec.where}
    for sample in _STREAMS[source](split=spec.split, **kwargs):
        read += 1
        if not _matches(sample, spec.where):
            for key, values in seen.items():
                if len(values) < 50:
                    values.add(str(sample.meta.get(key)))
            continue
        kept += 1
        yield sample
        if spec.limit is not None and kept >= spec.limit:
            return
    if read and not kept:
        present = {key: sorted(values) for key, values in seen.items()}
        raise DataError(f"no sample of {spec} matches where={spec.where}; values present: {present}")
    if not kept:
        raise DataError(f"data source {spec} is empty; check its path and split")


def _matches(sample: Sample, where: dict[str, list[Any]]) -> bool:
    return all(sample.meta.get(key) in values for key, values in where.items())


def _matching(samples: list[Sample], spec: DataSpec) -> list[Sample]:
    kept = [s for s in samples if _matches(s, spec.where)]
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
        hf_conversations,
        jsonl,
        llava_json,
        preference,
        vqav2,
    )
