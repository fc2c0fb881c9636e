"""Image loading: every PIL mode becomes RGB, and a broken file becomes a one-line error."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from vlmkit.errors import DataError


class LazyImage:
    """An image that is read and decoded only when a model needs it.

    Dataset sources hand these out instead of decoded images, so loading 400k VQAv2 rows keeps
    the encoded bytes where they are (a memory-mapped Arrow table) until a batch uses them.
    `key` names the picture (two questions about one image share it) for caches and grouping.
    """

    key: str

    def read(self) -> Image.Image | bytes | str | os.PathLike:
        """The image as a PIL image, encoded bytes, or a path."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.key


class BytesImage(LazyImage):
    """Encoded image bytes held in memory (small data sets, tests)."""

    def __init__(self, data: bytes, key: str) -> None:
        self.data = data
        self.key = key

    def read(self) -> bytes:
        return self.data


ImageLike = Image.Image | str | os.PathLike | LazyImage


def image_key(source: ImageLike | None) -> str | None:
    """A stable name for caching an image's pixels: its path or lazy key; None for decoded images."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, LazyImage):
        return source.key
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparency is composited on white, 16/32-bit ints are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(source: ImageLike) -> Image.Image:
    """Open a path, encoded bytes of a LazyImage, or a PIL image as a fully decoded RGB image."""
    if isinstance(source, LazyImage):
        name = source.key
        source = source.read()
        if isinstance(source, bytes):
            return _decode_bytes(source, name)
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"image {path} does not exist; check the path in the data source")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise DataError(too_large(str(path), exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {path} is corrupt or not an image ({exc}); replace or remove it") from None


def too_large(name: str, error: Exception) -> str:
    """The one-line message for an image over PIL's decompression-bomb limit."""
    pixels = str(error).split("(")[1].split(" ")[0] if "(" in str(error) else "too many"
    return (
        f"image {name} has {pixels} pixels, over PIL's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} "
        "(decompression-bomb guard); downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted"
    )


def _decode_bytes(data: bytes, name: str) -> Image.Image:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise DataError(too_large(name, exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {name} is corrupt or not an image ({exc}); replace or remove it") from None


def image_size(source: ImageLike) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None if it cannot be read
    (the sample's real error is raised when a batch loads it)."""
    if isinstance(source, LazyImage):
        source = source.read()
    if isinstance(source, Image.Image):
        return source.size
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
