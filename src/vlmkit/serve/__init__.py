"""OpenAI-compatible HTTP serving with dynamic batching and a built-in web page.

`serve(model_dir)` runs a server, with the model in a process of its own (engine_process.py);
`create_app(adapter_or_engine, settings)` (in `vlmkit.serve.app`) builds the app for tests or
embedding. FastAPI/uvicorn are imported only when one of them is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmkit.serve.server import API_KEY_ENV, serve
from vlmkit.serve.settings import ServeSettings

if TYPE_CHECKING:
    from vlmkit.serve.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from vlmkit.serve.app import create_app

        return create_app
    raise AttributeError(name)


__all__ = ["API_KEY_ENV", "ServeSettings", "create_app", "serve"]
