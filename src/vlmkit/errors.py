"""Errors that reach the user as one line: what went wrong and how to fix it."""

from __future__ import annotations


class VlmkitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits non-zero."""

    exit_code = 2

    def __init__(self, *args: object) -> None:
        super().__init__(*(from_worker(a) if isinstance(a, str) else a for a in args))


def from_worker(message: str) -> str:
    """A DataLoader worker's error, re-raised by torch as "Caught X in DataLoader worker process 0.
    Original Traceback ...", back to its own one line (the traceback's last line)."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    _, sep, text = last.partition(": ")
    return text if sep else last


class ConfigError(VlmkitError):
    """A run config that cannot be used as written."""


class DataError(VlmkitError):
    """A data source or sample that cannot be read."""


class ModelLoadError(VlmkitError):
    """A folder or id that does not hold a model vlmkit can load."""


class SampleError(DataError):
    """One sample is unusable (corrupt image, too long, no answer); the run's policy decides skip or fail."""

    def __init__(self, sample_id: str, reason: str) -> None:
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason
