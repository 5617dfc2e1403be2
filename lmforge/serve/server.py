"""The HTTP server: an OpenAI-compatible API, health and Prometheus metrics, and a chat page, over one `Engine`.

The event loop never runs the model: requests go to the engine thread (`lmforge.infer.engine`), whose
events come back through `loop.call_soon_threadsafe` into a per-request asyncio queue. A client that goes
away cancels its request, which frees its batch slot and KV blocks before the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LMForgeError
from lmforge.infer.engine import Engine, EngineStoppedError, Event, QueueFullError
from lmforge.infer.generate import GenerationConfig
from lmforge.serve.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chunk_body,
    completion_body,
    new_id,
    usage,
)

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
    name = model_name or llm.config.name
    context = llm.config.block_size
    max_prompt = min(limits.max_prompt_tokens or context, context)
    max_new = min(limits.max_tokens or context, context)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:  # uvicorn has waited for (or given up on) open requests; cancel what is left
            engine.stop(drain=False, timeout=10)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif not loc:
            msg, param = "the request body must be a JSON object", None
        else:
            msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            if len(errs) > 1:
                msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
            param = loc[0] if loc else None
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # 404, 405, unparsable bodies
        msg = "the request body is not valid JSON" if e.status_code == 400 else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # never a bare traceback to a client
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = api_key
        path = request.url.path
        if key and (path.startswith("/v1/") or path == "/metrics"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    def check_model(model: str) -> None:
        if model != name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}", param="model",
                           code="model_not_found")

    def gen_config(body, default_max: int | None, prompt_len: int) -> GenerationConfig:
        room = context - prompt_len
        want = default_max if body.max_tokens is None else body.max_tokens
        return GenerationConfig(
            max_new_tokens=min(want if want is not None else room, room, max_new),
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p), top_k=body.top_k or 0,
            repetition_penalty=1.0 if body.repetition_penalty is None else float(body.repetition_penalty),
            stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()), seed=body.seed,
            stop_at_eos=not body.ignore_eos)

    def check_prompt(n: int) -> None:
        if n > max_prompt:
            raise APIError(400, f"the prompt has {n} tokens; this server takes at most {max_prompt}",
                           param="messages", code="context_length_exceeded")
        if n >= context:
            raise APIError(400, f"the prompt has {n} tokens and fills the model's context of {context}",
                           param="messages", code="context_length_exceeded")

    def submit(ids: list[int], gen: GenerationConfig, chat: bool) -> tuple[Any, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        try:
            req = engine.submit(ids, gen, chat=chat, sink=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from e
        except EngineStoppedError as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        except LMForgeError as e:
            raise APIError(400, str(e)) from e
        return req, q

    async def respond(request: Request, body, ids: list[int], chat: bool, default_max: int | None):
        if not getattr(llm.config.attention, "causal", True):
            raise APIError(400, f"{name!r} is a bidirectional encoder: it embeds text (/v1/embeddings) but does "
                                "not generate it", param="model", code="not_a_generator")
        body.check(max_new)
        check_prompt(len(ids))
        gen = gen_config(body, default_max, len(ids))
        req, q = submit(ids, gen, chat)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(stream(req, q, rid, chat, body.include_usage()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), limits.disconnect_poll)
                except TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        return Response(status_code=499)
                    continue
                if ev.finish_reason is not None:
                    break
        finally:
            if not req.done:
                req.cancel()
        c = req.result(timeout=5)
        if c.finish_reason == "error":
            raise APIError(500, f"generation failed: {c.error}", "server_error")
        return completion_body(rid, name, c, chat)

    async def stream(req, q: asyncio.Queue, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        def sse(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if chat:
                yield sse(chunk_body(rid, name, chat, "", role=True))
            while True:
                ev: Event = await q.get()
                if ev.text:
                    yield sse(chunk_body(rid, name, chat, ev.text))
                if ev.finish_reason is not None:
                    break
            if ev.finish_reason == "error":
                yield sse(APIError(500, f"generation failed: {req.error}", "server_error").body())
            else:
                yield sse(chunk_body(rid, name, chat, None, finish_reason=ev.finish_reason))
            if include_usage:
                yield sse({**chunk_body(rid, name, chat), "choices": [],
                           "usage": usage(len(req.prompt_ids), len(req.out_ids))})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or we are done: free the slot either way
            if not req.done:
                req.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        check_model(body.model)
        prompt = body.prompt_value()
        try:
            ids = llm.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        except LMForgeError as e:
            raise APIError(400, str(e), param="prompt") from e
        return await respond(request, body, ids, chat=False, default_max=16)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        check_model(body.model)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        tok = llm.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", param="model")
        try:
            text = tok.apply_chat_template(body.plain_messages(), add_generation_prompt=True)
        except LMForgeError as e:
            raise APIError(400, str(e), param="messages") from e
        ids = tok.encode(text, add_special_tokens=False)
        return await respond(request, body, ids, chat=True, default_max=None)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        embed = getattr(llm, "embed", None)
        if not callable(embed):
            raise APIError(400, f"{name!r} is a decoder language model and gives no sentence embeddings; serve an "
                                "encoder model (e.g. `lmforge serve --model <MiniLM folder>`) for /v1/embeddings",
                           param="model", code="embeddings_not_supported")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        try:  # in the engine thread: model work never overlaps a decode step
            vectors = await asyncio.wrap_future(engine.call(lambda: embed(texts)))
        except LMForgeError as e:  # e.g. a causal decoder: LLM.embed names what to load instead
            raise APIError(400, f"{name!r} gives no sentence embeddings: {e}", param="model",
                           code="embeddings_not_supported") from e
        if body.encoding_format == "base64":
            import base64

            import numpy as np

            enc = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        else:
            enc = [[float(x) for x in v] for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(enc)]
        n = sum(len(llm.tokenizer.encode(t)) for t in texts)
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "lmforge",
                                            "context_length": context}]}

    @app.get("/health")
    async def health():
        s = engine.stats()
        return {"status": "ok", "model": name, "waiting": s["waiting"], "running": s["running"]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        from lmforge.serve.page import chat_page

        return HTMLResponse(chat_page(name, bool(api_key)))

    return app


def prometheus_text(engine: Engine) -> str:
    """The engine's state in Prometheus' text exposition format."""
    s, m = engine.stats(), engine.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP lmforge_{name} {help_}", f"# TYPE lmforge_{name} {kind}", f"lmforge_{name} {value}"])

    metric("queue_length", "gauge", "Requests waiting to start.", s["waiting"])
    metric("running_sequences", "gauge", "Sequences in the running batch.", s["running"])
    metric("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           round(s["tokens_per_second"], 3))
    metric("generated_tokens_total", "counter", "Tokens generated.", s["tokens_total"])
    metric("requests_total", "counter", "Requests accepted.", s["requests_total"])
    metric("preemptions_total", "counter", "Sequences preempted for KV memory.", s["preemptions_total"])
    metric("kv_cache_blocks_used", "gauge", "KV cache blocks held by sequences.", s["kv_blocks_used"])
    metric("kv_cache_bytes", "gauge", "KV cache memory allocated.", s["kv_bytes_allocated"])
    lines += ["# HELP lmforge_time_to_first_token_seconds Time from request to first token.",
              "# TYPE lmforge_time_to_first_token_seconds histogram"]
    for b, n in zip(m.TTFT_BUCKETS, m.ttft_hist):
        lines.append(f'lmforge_time_to_first_token_seconds_bucket{{le="{b}"}} {n}')
    lines += [f'lmforge_time_to_first_token_seconds_bucket{{le="+Inf"}} {m.ttft_count}',
              f"lmforge_time_to_first_token_seconds_sum {m.ttft_sum}",
              f"lmforge_time_to_first_token_seconds_count {m.ttft_count}"]
    return "\n".join(lines) + "\n"


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
