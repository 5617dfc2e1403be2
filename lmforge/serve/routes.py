"""The HTTP routes and error handlers of the server, as module-level handlers.

`server.create_app` stores a `Serving` in `app.state.serving`; every handler reads the model, the engine
and the limits from there (`request.app.state`), so one module serves any number of apps.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LMForgeError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import GenerationConfig
from lmforge.infer.request import EngineStoppedError, Event, QueueFullError
from lmforge.serve.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    InspectRequest,
    chunk_body,
    completion_body,
    new_id,
    usage,
)


@dataclass
class Serving:
    """What the handlers of one app serve: the model, its engine and the request limits in effect."""

    llm: Any
    engine: Engine
    name: str  # the id clients pass as `model`
    api_key: str | None
    context: int  # the model's context (block_size)
    max_prompt: int  # most prompt tokens a request may send
    max_new: int  # cap on max_tokens
    created: int  # unix time the app was built (/v1/models)
    disconnect_poll: float  # seconds between checks for a vanished client on non-streaming requests


def _serving(request: Request) -> Serving:
    return request.app.state.serving


# ---- errors and authentication --------------------------------------------------------------------
async def api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def invalid_request(request: Request, e: RequestValidationError):
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


async def http_error(request: Request, e: StarletteHTTPException):  # 404, 405, unparsable bodies
    msg = "the request body is not valid JSON" if e.status_code == 400 else str(e.detail)
    return JSONResponse(APIError(e.status_code, msg).body(), status_code=e.status_code, headers=e.headers)


async def crash(request: Request, e: Exception):  # never a bare traceback to a client
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(),
                        status_code=500)


async def check_api_key(request: Request, call_next):
    """HTTP middleware: `/v1/*` and `/metrics` need `Authorization: Bearer <api_key>` when a key is set."""
    key = _serving(request).api_key
    path = request.url.path
    if key and (path.startswith("/v1/") or path == "/metrics"):
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
    return await call_next(request)


# ---- generation -------------------------------------------------------------------------------------
def _check_model(s: Serving, model: str) -> None:
    if model != s.name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {s.name!r}", param="model",
                       code="model_not_found")


def _gen_config(s: Serving, body, default_max: int | None, prompt_len: int) -> GenerationConfig:
    room = s.context - prompt_len
    want = default_max if body.max_tokens is None else body.max_tokens
    return GenerationConfig(
        max_new_tokens=min(want if want is not None else room, room, s.max_new),
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p), top_k=body.top_k or 0,
        repetition_penalty=1.0 if body.repetition_penalty is None else float(body.repetition_penalty),
        stop=tuple([body.stop] if isinstance(body.stop, str) else body.stop or ()), seed=body.seed,
        stop_at_eos=not body.ignore_eos)


def _check_prompt(s: Serving, n: int) -> None:
    if n > s.max_prompt:
        raise APIError(400, f"the prompt has {n} tokens; this server takes at most {s.max_prompt}",
                       param="messages", code="context_length_exceeded")
    if n >= s.context:
        raise APIError(400, f"the prompt has {n} tokens and fills the model's context of {s.context}",
                       param="messages", code="context_length_exceeded")


def _submit(s: Serving, ids: list[int], gen: GenerationConfig, chat: bool) -> tuple[Any, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Event] = asyncio.Queue()
    try:
        req = s.engine.submit(ids, gen, chat=chat, sink=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
    except QueueFullError as e:
        raise APIError(429, str(e), "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from e
    except EngineStoppedError as e:
        raise APIError(503, str(e), "server_error", code="shutting_down") from e
    except LMForgeError as e:
        raise APIError(400, str(e)) from e
    return req, q


async def _respond(request: Request, body, ids: list[int], chat: bool, default_max: int | None):
    """Submit a checked generation request; stream it, or wait for its end (cancelling it if the client goes)."""
    s = _serving(request)
    if not getattr(s.llm.config.attention, "causal", True):
        raise APIError(400, f"{s.name!r} is a bidirectional encoder: it embeds text (/v1/embeddings) but does "
                            "not generate it", param="model", code="not_a_generator")
    body.check(s.max_new)
    _check_prompt(s, len(ids))
    gen = _gen_config(s, body, default_max, len(ids))
    req, q = _submit(s, ids, gen, chat)
    rid = new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return StreamingResponse(_stream(s.name, req, q, rid, chat, body.include_usage()),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), s.disconnect_poll)
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
    return completion_body(rid, s.name, c, chat)


async def _stream(name: str, req, q: asyncio.Queue, rid: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
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


# ---- routes -----------------------------------------------------------------------------------------
async def completions(request: Request, body: CompletionRequest):
    s = _serving(request)
    _check_model(s, body.model)
    prompt = body.prompt_value()
    try:
        ids = s.llm.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
    except LMForgeError as e:
        raise APIError(400, str(e), param="prompt") from e
    return await _respond(request, body, ids, chat=False, default_max=16)


async def chat_completions(request: Request, body: ChatRequest):
    s = _serving(request)
    _check_model(s, body.model)
    if body.max_completion_tokens is not None and body.max_tokens is None:
        body.max_tokens = body.max_completion_tokens
    tok = s.llm.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat", param="model")
    try:
        text = tok.apply_chat_template(body.plain_messages(), add_generation_prompt=True)
    except LMForgeError as e:
        raise APIError(400, str(e), param="messages") from e
    ids = tok.encode(text, add_special_tokens=False)
    return await _respond(request, body, ids, chat=True, default_max=None)


async def embeddings(request: Request, body: EmbeddingRequest):
    s = _serving(request)
    _check_model(s, body.model)
    llm, name = s.llm, s.name
    embed = getattr(llm, "embed", None)
    if not callable(embed):
        raise APIError(400, f"{name!r} is a decoder language model and gives no sentence embeddings; serve an "
                            "encoder model (e.g. `lmforge serve --model <MiniLM folder>`) for /v1/embeddings",
                       param="model", code="embeddings_not_supported")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    try:  # in the engine thread: model work never overlaps a decode step
        vectors = await asyncio.wrap_future(s.engine.call(lambda: embed(texts)))
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


def _inspect_input(s: Serving, body: InspectRequest) -> tuple[list, dict[str, Any]]:
    """The analysis' input (texts, or one (1, T) id tensor for a conversation) and what the answer adds."""
    if body.messages is None:
        if body.reply is not None:
            raise APIError(400, "reply goes with messages (the conversation it answers)", param="reply")
        if body.text is None:
            raise APIError(400, "give text (or messages and reply)", param="text")
        texts = [body.text] if isinstance(body.text, str) else list(body.text)
        if not texts or not all(t.strip() for t in texts):
            raise APIError(400, "text is empty", param="text")
        return texts, {}
    tok = s.llm.tokenizer
    if tok is None or body.text is not None or not body.reply:
        raise APIError(400, "messages need a model with a tokenizer, a non-empty reply and no text",
                       param="messages")
    import torch

    try:
        prompt = tok.encode(tok.apply_chat_template(body.plain_messages(), add_generation_prompt=True),
                            add_special_tokens=False)
    except LMForgeError as e:
        raise APIError(400, str(e), param="messages") from e
    reply = tok.encode(body.reply, add_special_tokens=False)
    j = body.target_index
    if not 0 <= j < len(reply):
        raise APIError(400, f"target_index {j} is out of range: the reply has {len(reply)} tokens "
                            f"(0..{len(reply) - 1})", param="target_index")
    _check_prompt(s, len(prompt) + j)
    body.target = reply[j]  # the token explained, read after the prompt and the reply's tokens before it
    extra = {"reply_tokens": [tok.decode([i]) for i in reply], "target_index": j, "prompt_tokens": len(prompt)}
    return [torch.tensor([prompt + reply[:j]])], extra


async def inspect(request: Request, body: InspectRequest):
    """`POST /v1/inspect`: one analysis (`lmforge.inspect.run.analyze`) as JSON, e.g. the attribution of a reply."""
    from lmforge.inspect.run import analyze, as_json

    s = _serving(request)
    _check_model(s, body.model)
    texts, extra = _inspect_input(s, body)
    opts = body.options()

    def work() -> dict:
        result = analyze(s.llm, body.analysis, texts, **opts)
        return as_json(body.analysis, result, layer=body.layer, head=body.head)

    try:  # in the engine thread: model work never overlaps a decode step
        data = await asyncio.wrap_future(s.engine.call(work))
    except LMForgeError as e:
        raise APIError(400, str(e), param="analysis", code="inspect_failed") from e
    except EngineStoppedError as e:
        raise APIError(503, str(e), "server_error", code="shutting_down") from e
    return {"object": "inspection", "model": s.name, "analysis": body.analysis, **extra, **data}


async def models(request: Request):
    s = _serving(request)
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                        "owned_by": "lmforge", "context_length": s.context}]}


async def health(request: Request):
    s = _serving(request)
    stats = s.engine.stats()
    return {"status": "ok", "model": s.name, "waiting": stats["waiting"], "running": stats["running"]}


async def metrics(request: Request):
    return PlainTextResponse(prometheus_text(_serving(request).engine), media_type="text/plain; version=0.0.4")


async def page(request: Request):
    from lmforge.serve.page import chat_page

    s = _serving(request)
    return HTMLResponse(chat_page(s.name, bool(s.api_key)))


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
