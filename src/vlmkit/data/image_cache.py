"""One bounded cache of what images decode to, for every model that reads images.

A multi-epoch run over a small image set otherwise decodes (and resizes) the same files every
epoch. Entries are keyed by `image_key` (a path or a lazy image's key), so a decoded PIL image
handed in by a caller, which has no stable name, is never cached; the oldest entry goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from vlmkit.data.images import ImageLike, image_key

T = TypeVar("T")


class ImageCache(Generic[T]):
    """Least-recently-used map from an image's key to its decoded form; `size` 0 keeps nothing."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"image cache size must be >= 0, got {size}")
        self.size = size
        self._entries: OrderedDict[str, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, source: ImageLike | None) -> str | None:
        """The key `source` is cached under, or None when it is not cached (no key, or size 0)."""
        return image_key(source) if self.size else None

    def get(self, key: str | None) -> T | None:
        if key is None or key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: str | None, value: T) -> None:
        if key is None:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get_or_make(self, source: ImageLike | None, make: Callable[[], T]) -> T:
        """The cached value for `source`, or `make()` kept for next time."""
        key = self.key(source)
        cached = self.get(key)
        if cached is not None:
            return cached
        value = make()
        self.put(key, value)
        return value
