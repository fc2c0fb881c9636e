"""Errors returned to HTTP clients, always in the OpenAI shape `{"error": {message, type, param, code}}`.

The official `openai` client turns this body into a typed exception with the message intact, so
every rejection (limits, auth, queue full, timeout) reads the same from any OpenAI-compatible client.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses or cannot finish; `status` is the HTTP status code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole (the model process sends errors back over a pipe)."""
        return _api_error, (self.status, self.message, self.type, self.param, self.code, self.headers)


def _api_error(
    status: int, message: str, type: str, param: str | None, code: str | None, headers: dict[str, str]
) -> APIError:
    return APIError(status, message, type=type, param=param, code=code, headers=headers)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, *, param: str | None = None, code: str = "payload_too_large") -> APIError:
    return APIError(413, message, param=param, code=code)
