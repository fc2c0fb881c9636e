"""Eval options checked before any model loads: torch-free, so `vlmkit eval` refuses a bad
argument in well under a second."""

from __future__ import annotations

from vlmkit.errors import ConfigError
from vlmkit.eval.metrics import get_metric


def check_eval_options(
    metric: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    on_bad_sample: str = "fail",
) -> None:
    """One-line errors for bad eval options, cheap enough to run before any model loads."""
    if metric is not None:
        get_metric(metric)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1; leave it out to score every sample")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if on_bad_sample not in ("skip", "fail"):
        raise ConfigError(f"on_bad_sample {on_bad_sample!r} is not supported; use skip or fail")
