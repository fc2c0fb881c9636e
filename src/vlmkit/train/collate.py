"""Dataset and collator that turn Samples into model batches through the adapter.

A bad sample (corrupt image, too long, no answer) is never silently dropped: with
`on_bad_sample: skip` it is left out of its batch and recorded in the run's
`bad_samples.jsonl`; with `fail` the run stops on it with its id and reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from vlmkit.data.sample import Sample
from vlmkit.errors import DataError, SampleError
from vlmkit.models.adapters.base import Batch, ModelAdapter

logger = logging.getLogger(__name__)


class SampleDataset(Dataset):
    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class BadSampleLog:
    """Append-only record of skipped samples; a file, so DataLoader workers can write to it too."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, error: SampleError) -> None:
        """Record a sample once per run, however many epochs (or resumes) meet it again."""
        if error.sample_id in self.ids():
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"id": error.sample_id, "reason": error.reason}) + "\n")

    def ids(self) -> set[str]:
        if not self.path.exists():
            return set()
        return {json.loads(line)["id"] for line in self.path.read_text().splitlines() if line.strip()}

    def count(self) -> int:
        return len(self.ids())


class Collator:
    def __init__(
        self,
        adapter: ModelAdapter,
        on_bad_sample: Literal["skip", "fail"],
        bad_samples: BadSampleLog,
    ) -> None:
        self.adapter = adapter
        self.on_bad_sample = on_bad_sample
        self.bad_samples = bad_samples

    def __call__(self, samples: list[Sample]) -> Batch:
        """The adapter's batch plus `sample_ids` (popped by the trainer before the forward)."""
        try:
            batch = self.adapter.encode(samples, train=True)
            batch["sample_ids"] = [sample.id for sample in samples]  # type: ignore[assignment]
            return batch
        except SampleError as first_error:
            if self.on_bad_sample == "fail":
                raise DataError(
                    f"{first_error} (or set data.on_bad_sample: skip to skip and count such samples)"
                ) from None
        good = []
        for sample in samples:
            try:
                self.adapter.encode([sample], train=True)
            except SampleError as error:
                logger.warning("skipping %s", error)
                self.bad_samples.record(error)
            else:
                good.append(sample)
        if not good:
            raise DataError(
                f"every sample of a batch was bad (see {self.bad_samples.path}); check the data source"
            )
        batch = self.adapter.encode(good, train=True)
        batch["sample_ids"] = [sample.id for sample in good]  # type: ignore[assignment]
        return batch
