"""Chat templates: ChatML, and a sandboxed jinja2 renderer that renders Hugging Face chat templates the
way `transformers`' `apply_chat_template(tokenize=False)` does (same environment, globals and filters).

Templates come from downloaded model folders, so they are untrusted code: they run in jinja2's
`ImmutableSandboxedEnvironment`, which blocks attribute access to Python internals and mutation of
the inputs.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import ConfigError

# ChatML (OpenAI; used by Qwen, SmolLM2-Instruct and lmforge's own trained tokenizers).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text in some templates (for loss masks);
    # transformers tracks it, we only need it to parse and render its body unchanged.
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters ('<' -> \u003c); transformers' does not, nor do we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the sandbox (cached per template string).

    Raises ConfigError if the template is not valid jinja.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"chat template has a jinja syntax error at line {e.lineno}: {e.message}; "
                          "fix the template in tokenizer_config.json") from None


def validate_messages(messages: Any) -> list[dict]:
    """Check a conversation and return it with None-valued keys dropped (as transformers does).

    Each message must be a dict with "role" in system/user/assistant/tool and a str "content"; an
    assistant message that carries "tool_calls" may leave out its content. Raises ConfigError otherwise.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise ConfigError(f"messages must be a non-empty list of dicts like "
                          f'[{{"role": "user", "content": "Hi"}}], got {type(messages).__name__}'
                          + (" (empty)" if isinstance(messages, list | tuple) else ""))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ConfigError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) and not (role == "assistant" and content is None and m.get("tool_calls")):
            raise ConfigError(f"message {i} ({role}) needs a str 'content', got "
                              f"{'no content' if 'content' not in m else type(content).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         tools: list[dict] | None = None, **kwargs: Any) -> str:
    """Render `messages` with a jinja chat template, as `transformers` does with `tokenize=False`.

    The template sees `messages`, `tools`, `documents` (None), `add_generation_prompt` and `kwargs`
    (typically `bos_token`, `eos_token`, ... and template options such as `enable_thinking`).
    Raises ConfigError for malformed messages or a template that calls `raise_exception`.
    """
    messages = validate_messages(messages)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ConfigError("tools must be a list of JSON-schema dicts "
                          '({"type": "function", "function": {"name": ..., "parameters": ...}})')
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise ConfigError(f"chat template rejected the conversation: {e}") from None
