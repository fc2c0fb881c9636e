"""Operator settings of the HTTP server: batching knobs and every limit a request is checked against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

MiB = 1024 * 1024
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class ServeSettings(BaseModel):
    """All limits default to values safe on a public port; raise them deliberately.

    Remote image URLs are off unless `allowed_image_hosts` names hosts (exact host names, no
    wildcards), so by default the server never makes an outbound request (no SSRF).
    """

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("vlmkit", min_length=1, description="id shown by /v1/models and in responses")
    api_key: SecretStr | None = Field(None, description="when set, /v1/* needs `Authorization: Bearer KEY`")

    # batching
    max_batch_size: int = Field(16, ge=1, description="most requests in one model call")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="how long an idle model waits to fill a batch"
    )
    short_first_batches: int = Field(
        2,
        ge=0,
        description="batches of shorter requests (fewer max_tokens) that may run ahead of a waiting "
        "longer one; 0: strictly oldest first",
    )
    max_queue: int = Field(256, ge=1, description="requests waiting for the model; beyond it: 429")
    request_timeout_s: float = Field(120.0, gt=0, description="queue + generation budget; beyond it: 504")

    # request limits
    max_body_bytes: int = Field(16 * MiB, ge=1024, description="request body; beyond it: 413")
    max_image_bytes: int = Field(10 * MiB, ge=1, description="encoded image; beyond it: 413")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width*height, checked before decoding")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none")
    max_tokens_cap: int = Field(512, ge=1, description="largest max_tokens accepted; beyond it: 400")
    max_stop_strings: int = Field(4, ge=0)

    # remote images (off by default)
    allowed_image_hosts: list[str] = Field(
        default_factory=list, description="hosts http(s) images may come from"
    )
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="total time to fetch one remote image")

    # prompt length (checked at admission, before queueing)
    max_context_tokens: int | None = Field(
        None,
        ge=2,
        description="prompt + max_tokens bound; default the model's own context (max positions)",
    )

    # images (decoded in a worker pool, limits checked on the header first)
    image_formats: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IMAGE_FORMATS),
        min_length=1,
        description="Pillow formats accepted; others (ICO, TIFF, MPO, ...) are refused before decoding",
    )
    max_image_frames: int = Field(
        64, ge=1, description="frames of an animated image (only the first is used)"
    )
    decode_workers: int = Field(2, ge=1, le=64, description="threads that decode images and count tokens")
    max_images: int = Field(
        8, ge=1, le=256, description="images in one request (where the model takes several)"
    )
    max_queued_image_bytes: int = Field(
        1024 * MiB, ge=MiB, description="decoded image bytes held by waiting requests; beyond it: 429"
    )

    # connections
    header_timeout_s: float = Field(10.0, gt=0, description="time to send a request's headers")
    body_timeout_s: float = Field(30.0, gt=0, description="time to send a request's body; beyond it: 408")
    idle_timeout_s: float = Field(5.0, gt=0, description="keep-alive connection left idle")
    shutdown_grace_s: float = Field(10.0, ge=0, description="running requests' time to finish on shutdown")

    # browsers
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS),
        min_length=1,
        description="Host header values accepted (no port); '*' accepts any (DNS-rebinding guard)",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins whose pages may call the API (CORS); none by default"
    )

    # the model
    model_process: bool = Field(
        True,
        description="run the model in its own process (`serve` only), so HTTP work never holds its GIL",
    )

    # sampling options
    max_n: int = Field(8, ge=1, description="largest n (choices per request)")
    max_top_logprobs: int = Field(20, ge=0, description="largest top_logprobs")

    @field_validator("allowed_image_hosts")
    @classmethod
    def _lower_hosts(cls, hosts: list[str]) -> list[str]:
        return [host.strip().lower().rstrip(".") for host in hosts if host.strip()]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        return [host.strip().lower().strip("[]").rstrip(".") for host in hosts if host.strip()]

    @field_validator("image_formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        known = set(Image.OPEN)
        upper = [name.strip().upper() for name in formats]
        unknown = [name for name in upper if name not in known]
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow opens {sorted(known)}")
        return upper

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap ({self.max_tokens_cap})"
            )
        return self

    def key(self) -> str | None:
        """The API key in clear, or None when the server is open."""
        return self.api_key.get_secret_value() if self.api_key else None
