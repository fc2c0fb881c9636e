"""Connection- and browser-level guards that run before the app: Host allow-list, header timeout.

`HostGuard` rejects requests whose `Host` is not allow-listed: a DNS-rebinding page reaches
127.0.0.1 under its own host name, so checking `Host` is what keeps it from reading answers
from a key-less local server. `header_timeout_protocol` closes connections that do not finish
sending a request's headers in time (uvicorn only times out idle keep-alive connections).
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger(__name__)


def host_name(header: str) -> str:
    """`Host` header -> lower-case host without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header.rstrip(".")


class HostGuard:
    """Pure ASGI middleware: 400 (OpenAI-shaped JSON) unless the Host is in `allowed`."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if host.rstrip(".") in self.allowed:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": {
                    "message": f"Host {host!r} is not allowed; the operator can add it with allowed_hosts "
                    "(--allowed-host)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "host_not_allowed",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not complete
    within `timeout_s` of the connection opening or of the previous response (slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._headers_overdue, cycle)

        def _headers_overdue(self, cycle_at_arming: Any) -> None:
            if self.cycle is cycle_at_arming and not self.transport.is_closing():
                logger.info("closing a connection that sent no complete request headers in %.1f s", timeout_s)
                self.transport.close()

    return HeaderTimeoutH11Protocol
