"""Image parts of a request -> decoded RGB images, with every size limit checked before the work it guards.

Order matters: the encoded size is checked before base64 decoding, the declared width x height
before pixel decoding (a 50 KB PNG can declare 10^10 pixels), and remote fetches only go to
hosts the operator allow-listed, without redirects, proxies from the environment, or unbounded reads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import re
import struct
from concurrent.futures import Executor
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from vlmkit.data.images import to_rgb
from vlmkit.serve.errors import bad_request, too_large
from vlmkit.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

PARAM = "messages.content.image_url"
_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


def decode_data_url(url: str, settings: ServeSettings) -> bytes:
    """The bytes of a `data:image/...;base64,` URL; refuses oversized payloads before decoding them."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise bad_request("image data URLs must look like data:image/png;base64,<data>", param=PARAM)
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise bad_request(f"data URL has media type {mime!r}, not an image", param=PARAM)
    payload = url[match.end() :]
    if len(payload) // 4 * 3 > settings.max_image_bytes + 2:
        raise too_large(
            f"image is about {len(payload) // 4 * 3} bytes; this server accepts at most "
            f"{settings.max_image_bytes} (max_image_bytes)",
            param=PARAM,
            code="image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image data URL is not valid base64", param=PARAM) from None
    if len(data) > settings.max_image_bytes:
        raise too_large(
            f"image is {len(data)} bytes; this server accepts at most {settings.max_image_bytes} (max_image_bytes)",
            param=PARAM,
            code="image_too_large",
        )
    return data


def decode_image(data: bytes, settings: ServeSettings) -> Image.Image:
    """Decode to RGB, checking on the header first: format (only `image_formats` are even tried,
    so e.g. an ICO, whose plugin decodes an embedded PNG while opening, never gets that far),
    declared width x height (decompression bombs) and frame count; only the first frame is decoded.
    """
    try:
        with Image.open(io.BytesIO(data), formats=settings.image_formats) as image:
            if image.format not in settings.image_formats:  # e.g. the JPEG plugin opening an MPO
                raise bad_request(
                    f"images in {image.format} format are not accepted; send one of "
                    f"{', '.join(settings.image_formats)} (image_formats)",
                    param=PARAM,
                    code="image_format_not_allowed",
                )
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise bad_request(
                    f"image is {width}x{height} = {width * height} pixels; this server accepts at most "
                    f"{settings.max_image_pixels} (max_image_pixels)",
                    param=PARAM,
                    code="image_too_many_pixels",
                )
            frames = getattr(image, "n_frames", 1)
            if frames > settings.max_image_frames:
                raise bad_request(
                    f"image has {frames} frames; this server accepts at most {settings.max_image_frames} "
                    "(max_image_frames), and uses only the first",
                    param=PARAM,
                    code="image_too_many_frames",
                )
            if frames > 1:
                image.seek(0)
            image.load()
            if image.size != (width, height):
                raise bad_request(
                    "image frame size differs from its header", param=PARAM, code="invalid_image"
                )
            return to_rgb(image)
    except Image.DecompressionBombError:
        raise bad_request(
            "image refused as a decompression bomb (too many pixels)",
            param=PARAM,
            code="image_too_many_pixels",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        logger.info("image decoding failed: %s: %s", type(exc).__name__, exc)
        raise bad_request(
            f"image could not be decoded (is it one of {', '.join(settings.image_formats)}?)",
            param=PARAM,
            code="invalid_image",
        ) from None


def check_remote_url(url: str, settings: ServeSettings) -> None:
    """Refuse an http(s) URL unless its host is allow-listed; no list means no remote images at all."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_request(
            "image_url must be a data: URL (or an http(s) URL where the operator allows it)", param=PARAM
        )
    if not settings.allowed_image_hosts:
        raise bad_request(
            "remote image URLs are disabled on this server; send the image inline as "
            "data:image/png;base64,... (operators can allow hosts with allowed_image_hosts)",
            param=PARAM,
            code="remote_images_disabled",
        )
    host = parts.hostname.lower().rstrip(".")
    if host not in settings.allowed_image_hosts or parts.username or parts.password:
        raise bad_request(
            f"image host {host!r} is not in this server's allowed_image_hosts",
            param=PARAM,
            code="image_host_not_allowed",
        )


async def fetch_image_bytes(url: str, settings: ServeSettings) -> bytes:
    """GET an allow-listed image: no redirects, no env proxies, bounded size and total time."""
    check_remote_url(url, settings)
    try:
        return await asyncio.wait_for(_fetch(url, settings), timeout=settings.image_fetch_timeout_s)
    except asyncio.TimeoutError:
        raise bad_request(
            f"fetching the image took longer than {settings.image_fetch_timeout_s} s",
            param=PARAM,
            code="image_fetch_failed",
        ) from None
    except httpx.HTTPError as exc:
        logger.info("image fetch from %s failed: %s", url, exc)
        raise bad_request(
            f"could not fetch the image ({type(exc).__name__})", param=PARAM, code="image_fetch_failed"
        ) from None


async def _fetch(url: str, settings: ServeSettings) -> bytes:
    limit = settings.max_image_bytes
    async with (
        httpx.AsyncClient(
            timeout=settings.image_fetch_timeout_s, follow_redirects=False, trust_env=False
        ) as client,
        client.stream("GET", url) as response,
    ):
        if response.status_code != 200:
            raise bad_request(
                f"image URL answered HTTP {response.status_code} (redirects are not followed)",
                param=PARAM,
                code="image_fetch_failed",
            )
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(
                f"remote image is {declared} bytes; limit is {limit} (max_image_bytes)",
                param=PARAM,
                code="image_too_large",
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise too_large(
                    f"remote image exceeds {limit} bytes (max_image_bytes)",
                    param=PARAM,
                    code="image_too_large",
                )
            chunks.append(chunk)
        return b"".join(chunks)


async def load_image_url(url: str, settings: ServeSettings, pool: Executor | None = None) -> Image.Image:
    """A data: or allow-listed http(s) URL -> RGB image, decoded in `pool` (never on the event loop:
    even small images can be costly, and eight at once stalled every other request)."""
    loop = asyncio.get_running_loop()
    if url.startswith("data:"):
        return await loop.run_in_executor(
            pool, lambda: decode_image(decode_data_url(url, settings), settings)
        )
    data = await fetch_image_bytes(url, settings)
    return await loop.run_in_executor(pool, decode_image, data, settings)
