"""Serving: an OpenAI-compatible HTTP server with a chat page, over the continuous-batching engine.

    import lmforge
    lmforge.serve(lmforge.load("smollm2"), host="127.0.0.1", port=8000)

`lmforge.serve` is this package, and calling it calls `server.serve` (FastAPI and uvicorn are imported
only then). `ServerThread` runs a server in a background thread; `create_app` gives the ASGI app.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def serve(llm, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve `llm` over HTTP until SIGINT/SIGTERM; see `lmforge.serve.server.serve` for the options."""
    from lmforge.serve.server import serve as _serve

    _serve(llm, host, port, **options)


def __getattr__(name: str):
    if name in ("ServerThread", "create_app", "ServerLimits"):
        from lmforge.serve import server

        return getattr(server, name)
    raise AttributeError(name)


class _CallableModule(types.ModuleType):
    """Lets `lmforge.serve(llm)` call `serve` while `lmforge.serve` stays the package."""

    def __call__(self, llm, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
        serve(llm, host, port, **options)


sys.modules[__name__].__class__ = _CallableModule
