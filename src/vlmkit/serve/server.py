"""`serve`: load a model folder and run the HTTP server on it (what `vlmkit serve` calls)."""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from vlmkit.errors import ConfigError, VlmkitError

logger = logging.getLogger(__name__)

API_KEY_ENV = "VLMKIT_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    device: str | None = None,
    log_level: str = "info",
    config_file: str | None = None,
    **limits: Any,
) -> None:
    """Serve `model_dir` until interrupted. `limits` are ServeSettings fields (e.g. max_batch_size=8);
    `config_file` is a YAML or JSON file of them (`limits` given here win over the file's).

    The API key comes from `api_key` or else the VLMKIT_API_KEY environment variable; without one
    the API is open, which is only sensible on 127.0.0.1 (the default host).
    """
    try:
        import uvicorn  # noqa: F401  (fail early, with the install hint)

        from vlmkit.serve.app import create_app
    except ImportError as exc:
        raise VlmkitError(
            f"serving needs the serve extra ({exc.name} is missing): pip install 'vlmkit[serve]'"
        ) from None
    from pydantic import ValidationError

    from vlmkit.serve.settings import ServeSettings

    if config_file is not None:
        limits = {**read_settings_file(config_file), **limits}
    limits.setdefault("model_name", os.path.basename(os.path.normpath(model_dir)) or "vlmkit")
    try:
        settings = ServeSettings(api_key=api_key or os.environ.get(API_KEY_ENV) or None, **limits)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"invalid server setting {where}: {error['msg']}") from None
    if settings.api_key is None and host not in LOOPBACK:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this port can use the model", host
        )
    if "allowed_hosts" not in limits and host not in LOOPBACK:
        # reachable under other names: allow the bound address, or any Host on a wildcard bind
        extra = ["*"] if host in ("0.0.0.0", "::", "") else [host]
        settings = settings.model_copy(update={"allowed_hosts": [*settings.allowed_hosts, *extra]})
    app = create_app(load_model(model_dir, settings, device=device, log_level=log_level), settings)
    # Everything loaded so far (torch, transformers, the app) lives as long as the server: keep it
    # out of the collector's full passes, which otherwise walk it all and stall every request.
    gc.freeze()
    logger.info("serving %s on http://%s:%d (web page at /)", model_dir, host, port)
    make_server(app, settings, host=host, port=port, log_level=log_level).run()


def load_model(model_dir: str, settings: Any, *, device: str | None = None, log_level: str = "info") -> Any:
    """The engine `serve` runs: the model in a child process (`model_process`), else an adapter
    that the app runs in one of this process's threads."""
    if settings.model_process:
        from vlmkit.serve.engine_process import ProcessEngine

        return ProcessEngine.start(
            model_dir, device=device, max_context_tokens=settings.max_context_tokens, log_level=log_level
        )
    from vlmkit.serve.engine import load_served_adapter

    return load_served_adapter(model_dir, device)


def make_server(app: Any, settings: Any, **config: Any) -> Any:
    """A uvicorn server for `app` with the settings' connection timeouts and graceful shutdown.

    On shutdown it stops accepting connections, then awaits `app.state.drain()` (new requests
    503, running ones get `shutdown_grace_s`, then 503 / an error event and `[DONE]`) before
    uvicorn's own shutdown, so nothing is cut off with a plain-text 500.
    """
    import uvicorn

    from vlmkit.serve.guards import header_timeout_protocol

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:
                server.close()
            drain = getattr(app.state, "drain", None)
            if drain is not None:
                await drain()
            await super().shutdown(sockets)

    options = {
        "http": header_timeout_protocol(settings.header_timeout_s),
        "timeout_keep_alive": settings.idle_timeout_s,
        "timeout_graceful_shutdown": settings.shutdown_grace_s + 5,
        **config,
    }
    return GracefulServer(uvicorn.Config(app, **options))


def read_settings_file(path: str) -> dict[str, Any]:
    """ServeSettings fields from a YAML/JSON mapping (validated with the rest, by ServeSettings)."""
    import yaml

    from vlmkit.config import read_yaml  # the run configs' YAML 1.2 scalars

    try:
        with open(path, encoding="utf-8") as handle:
            data = read_yaml(handle.read())
    except OSError as exc:
        raise ConfigError(f"cannot read the serve config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"serve config {path} is not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"serve config {path} must be a mapping of settings, e.g. max_queue: 64")
    return data
