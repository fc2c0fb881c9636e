"""Vision-tower outputs kept per image, so a frozen tower runs once per image, not once per epoch.

The cache holds the projector's input (the tower's selected features) keyed by the image key the
collator gives each `pixel_values` row. It is consulted only while every tower parameter is
frozen and the current batch's keys are known (`batch_keys`); otherwise the tower runs as usual,
so turning it on can never change what a trainable tower learns. A frozen tower runs in eval
mode (`VisionLanguageModel.train`), so BatchNorm statistics and dropout cannot make a cached
row differ from a recomputed one.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


class VisionFeatureCache:
    """LRU store of per-image tower features, bounded by `max_bytes`, kept on `device` (None: the
    model's device)."""

    def __init__(self, max_bytes: int, device: torch.device | str | None = None) -> None:
        self.max_bytes = max_bytes
        self.device = torch.device(device) if device is not None else None
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._keys: list[str | None] | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @contextlib.contextmanager
    def batch_keys(self, keys: Sequence[str | None] | None) -> Iterator[None]:
        """Name the rows of the `pixel_values` the next forwards see (one key per row; None: an
        image without a stable name, computed every time)."""
        previous, self._keys = self._keys, list(keys) if keys is not None else None
        try:
            yield
        finally:
            self._keys = previous

    def features(
        self, pixel_values: torch.Tensor, tower: nn.Module, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """`compute(pixel_values)`, taking rows from the cache where it can and filling it."""
        keys = self._keys
        if any(p.requires_grad for p in tower.parameters()):
            self.clear()  # a tower that trains invalidates every stored row
            return compute(pixel_values)
        if keys is None or len(keys) != pixel_values.shape[0]:
            return compute(pixel_values)
        rows: dict[int, torch.Tensor] = {}
        missing = []
        for i, key in enumerate(keys):
            if key is not None and key in self._store:
                self._store.move_to_end(key)
                rows[i] = self._store[key]
                self.hits += 1
            else:
                missing.append(i)
        if missing:
            self.misses += len(missing)
            with torch.no_grad():  # the tower is frozen: nothing upstream of its output learns
                fresh = compute(pixel_values[missing])
            for i, row in zip(missing, fresh, strict=True):
                rows[i] = row
                if keys[i] is not None:
                    self._put(keys[i], row)
        out = torch.stack([rows[i].to(pixel_values.device, non_blocking=True) for i in range(len(keys))])
        return out

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0

    def _put(self, key: str, row: torch.Tensor) -> None:
        # A copy, not a view: a view would keep the whole batch's feature tensor alive.
        stored = row.detach().to(self.device or row.device, copy=True)
        if stored.device.type == "cpu" and torch.cuda.is_available():
            stored = stored.pin_memory()
        size = stored.numel() * stored.element_size()
        if size > self.max_bytes:
            return
        self._store[key] = stored
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
