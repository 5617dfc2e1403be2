"""The HTTP server: an OpenAI-compatible API, health and Prometheus metrics, and a chat page, over one `Engine`.

The event loop never runs the model: requests go to the engine thread (`lmforge.infer.engine`), whose
events come back through `loop.call_soon_threadsafe` into a per-request asyncio queue. A client that goes
away cancels its request, which frees its batch slot and KV blocks before the next decode step.

This module builds the app (`create_app`) and runs it (`serve`, `ServerThread`); the handlers are in routes.py.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.infer.engine import Engine
from lmforge.serve import routes
from lmforge.serve.api import APIError

API_KEY_ENV = "LMFORGE_API_KEY"


@dataclass
class ServerLimits:
    """What one request may ask for. Defaults: 1 MiB bodies, prompts and max_tokens up to the context."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int | None = None  # cap on max_tokens; None: the model's context
    disconnect_poll: float = 0.25  # seconds between checks for a vanished client on non-streaming requests


class _BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await _send_error(send, APIError(413, f"request body of {int(v)} bytes is over the limit of "
                                                             f"{self.limit} bytes", code="body_too_large"))
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_error(send, APIError(413, f"request body is over the limit of {self.limit} bytes",
                                             code="body_too_large"))


class _TooLarge(Exception):
    pass


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.engine
    engine.start()
    try:
        yield
    finally:  # uvicorn has waited for (or given up on) open requests; cancel what is left
        engine.stop(drain=False, timeout=10)


def create_app(llm, engine: Engine | None = None, model_name: str | None = None, api_key: str | None = None,
               limits: ServerLimits | None = None, **engine_options: Any) -> FastAPI:
    """A FastAPI app serving `llm`. The engine starts and stops with the app (its lifespan).

    Args:
        llm: an `lmforge.LLM`.
        engine: an engine to use (default: a new `Engine(llm, **engine_options)`).
        model_name: the id clients pass as `model` (default: the model's config name).
        api_key: when set, `/v1/*` and `/metrics` need `Authorization: Bearer <api_key>`.
        limits: request limits (`ServerLimits`).
    """
    engine = engine or Engine(llm, **engine_options)
    limits = limits or ServerLimits()
    context = llm.config.block_size
    app = FastAPI(title="lmforge", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.serving = routes.Serving(
        llm=llm, engine=engine, name=model_name or llm.config.name, api_key=api_key, context=context,
        max_prompt=min(limits.max_prompt_tokens or context, context),
        max_new=min(limits.max_tokens or context, context), created=int(time.time()),
        disconnect_poll=limits.disconnect_poll)
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.exception_handler(APIError)(routes.api_error)
    app.exception_handler(RequestValidationError)(routes.invalid_request)
    app.exception_handler(StarletteHTTPException)(routes.http_error)
    app.exception_handler(Exception)(routes.crash)
    app.middleware("http")(routes.check_api_key)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/embeddings")(routes.embeddings)
    app.post("/v1/inspect")(routes.inspect)
    app.get("/v1/models")(routes.models)
    app.get("/health")(routes.health)
    app.get("/metrics")(routes.metrics)
    app.get("/")(routes.page)
    return app


def _config(app: FastAPI, sock_or_host, port: int | None, graceful_timeout: float, log_level: str):
    import uvicorn

    kw = {} if port is None else {"host": sock_or_host, "port": port}
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, access_log=False,
                          lifespan="on", **kw)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          model_name: str | None = None, limits: ServerLimits | None = None, graceful_timeout: float = 10.0,
          log_level: str = "info", **engine_options: Any) -> None:
    """Serve `llm` over HTTP until SIGINT/SIGTERM (blocking): OpenAI's API under /v1, a chat page at /.

    On SIGTERM the server stops accepting connections, lets open requests finish for up to
    `graceful_timeout` seconds, then cancels the rest. `api_key` defaults to $LMFORGE_API_KEY.
    """
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(llm, model_name=model_name, api_key=api_key, limits=limits, **engine_options)
    uvicorn.Server(_config(app, host, port, graceful_timeout, log_level)).run()


class ServerThread:
    """A real uvicorn server on a free port in a background thread (for tests and embedding in programs).

    `with ServerThread(llm) as s:` then talk to `s.url` (`s.base_url` for the openai client); `s.engine` is
    the engine. Binds 127.0.0.1 unless told otherwise.
    """

    def __init__(self, llm, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0, **options: Any):
        import uvicorn

        self.app = create_app(llm, **options)
        self.engine: Engine = self.app.state.engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(_config(self.app, None, None, 5.0, "warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
