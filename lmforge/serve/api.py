"""OpenAI-compatible request bodies and responses: what `/v1/completions`, `/v1/chat/completions` and
`/v1/embeddings` accept, checked strictly (wrong types are errors, not coerced), and the JSON they answer.

Parameters OpenAI defines but lmforge does not implement (n > 1, logprobs, echo, non-zero presence or
frequency penalties) are refused with a 400 that says so, rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from lmforge.infer.request import Completion


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Number = Annotated[float, Field(strict=True)]


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None  # not OpenAI's; llama.cpp's and vLLM's servers take it too
    repetition_penalty: Number | None = None  # likewise
    ignore_eos: StrictBool = False  # likewise (vLLM's name): generate max_tokens even past EOS, for benchmarks
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = 1
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logprobs: Any = None
    user: StrictStr | None = None
    # decoding strategies lmforge's generator has but the serving engine does not (refused in `check`, so that
    # a client asking for them learns it instead of getting plain sampling): vLLM's names and lmforge's own
    num_beams: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    prompt_lookup: Any = None

    def check(self, max_tokens_limit: int) -> None:
        """Range checks OpenAI makes, as 400s naming the parameter."""
        if self.max_tokens is not None and not 1 <= self.max_tokens <= max_tokens_limit:
            raise APIError(400, f"max_tokens must be between 1 and {max_tokens_limit}, got {self.max_tokens}",
                           param="max_tokens")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise APIError(400, f"temperature must be between 0 and 2, got {self.temperature}", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None and self.top_k < 0:
            raise APIError(400, f"top_k must be >= 0, got {self.top_k}", param="top_k")
        if self.repetition_penalty is not None and not 0 < self.repetition_penalty <= 10:
            raise APIError(400, f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
                           param="repetition_penalty")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise APIError(400, "seed must fit in 64 bits", param="seed")
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty",
                           param="presence_penalty" if self.presence_penalty else "frequency_penalty")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for param, off in (("num_beams", 1), ("best_of", 1), ("use_beam_search", False), ("prompt_lookup", 0)):
            value = getattr(self, param)
            if value is not None and not (type(value) is type(off) and value == off):
                what = "prompt-lookup speculative decoding" if param == "prompt_lookup" else "beam search"
                raise APIError(400, f"{param}={value!r}: {what} is not served (the engine decodes every request "
                                    "token by token in a shared batch); leave it out, or use LLM.generate / "
                                    "`lmforge generate` for it", param=param)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one prompt, as text or token ids."""

    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(400, "one prompt per request is supported (got a list of several)", param="prompt")
            p = p[0]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        if self.echo or self.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if self.echo else "suffix")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None

    def plain_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: StrictStr
    input: StrictStr | list[StrictStr] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32, the openai client's default


class InspectRequest(BaseModel):
    """`POST /v1/inspect` (lmforge's own): run one analysis of `lmforge.inspect` on the served model.

    The input is `text`, or a conversation (`messages`, rendered with the model's chat template as for
    /v1/chat/completions) followed by the start of the assistant's `reply`: then the token explained is the
    reply's token `target_index`, read after the prompt and the reply's tokens before it.
    """

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt option is an error, not a default
    model: StrictStr
    analysis: StrictStr
    text: StrictStr | list[StrictStr] | None = None
    messages: list[ChatMessage] | None = None
    reply: StrictStr | None = None
    target_index: StrictInt = 0
    layer: StrictInt | None = None
    head: StrictInt | None = None
    target: StrictStr | StrictInt | None = None
    k: StrictInt = Field(5, ge=1, le=100)
    attribution: StrictStr = "integrated_gradients"
    steps: StrictInt = Field(50, ge=1, le=1000)
    method: StrictStr = "gausslegendre"
    baseline: StrictStr = "pad"
    metric: StrictStr = "loss"
    distractor: StrictStr | StrictInt | None = None
    task: StrictStr = "comedy_vs_tragedy"
    pooling: StrictStr = "mean"
    limit: StrictInt | None = None
    seed: StrictInt = 0

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages or ()]

    def options(self) -> dict[str, Any]:
        """The analysis' keyword options (`lmforge.inspect.run.analyze`)."""
        skip = {"model", "analysis", "text", "messages", "reply", "target_index"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


# ---- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, c: Completion, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": c.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": c.text}
    else:
        choice["text"] = c.text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(c.prompt_tokens, c.completion_tokens)}


def chunk_body(rid: str, model: str, chat: bool, text: str | None = None, finish_reason: str | None = None,
               role: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}
