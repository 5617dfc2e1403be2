"""CLI commands for inference: `lmforge generate` and `lmforge chat`."""

from __future__ import annotations

import sys


def generate(prompt: list[str], model: str = "runs/quickstart/model", max_new_tokens: int = 128,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop: list[str] | None = None, seed: int | None = None, dtype: str = "float32",
             truncate: bool = False, stream: bool = True) -> int:
    """Continue one or more prompts with a model and print the text.

    Several prompts run as one left-padded batch. Example:
    lmforge generate "ROMEO:" --model runs/quickstart/model --temperature 0.8 --seed 0

    Args:
        prompt: the text(s) to continue.
        model: a model folder, a .gguf file, a short name (smollm2) or preset:<name>.
        max_new_tokens: how many tokens to add at most.
        temperature: 0 = greedy; higher = more random.
        top_k: sample only among the k most likely tokens (0 = off).
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches p (1 = off).
        repetition_penalty: > 1 discourages repeating tokens already present.
        stop: stop when one of these strings appears (not printed).
        seed: random seed, for reproducible sampling.
        dtype: float32 or bfloat16.
        truncate: keep the last tokens of a prompt longer than the context instead of failing.
        stream: print text as it is generated (one prompt only).
    """
    import lmforge

    llm = lmforge.load(model, dtype=dtype)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, stop=stop, seed=seed, truncate=truncate)
    if stream and len(prompt) == 1:
        sys.stdout.write(prompt[0])
        for piece in llm.generate(prompt[0], stream=True, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    outs = llm.generate(prompt, **kw)
    for p, o in zip(prompt, outs):
        print(p + o)
        if len(prompt) > 1:
            print("-" * 40)
    return 0


def chat(model: str = "smollm2", message: list[str] | None = None, system: str | None = None,
         max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
         dtype: str = "float32") -> int:
    """Talk with a chat model, using the model's own chat template.

    Interactive by default: type a message, get a streamed reply; /exit or end of input (Ctrl-D) ends,
    /reset starts over. With --message, each given message is sent in turn and the replies printed.

    Args:
        model: a model folder, a .gguf file or a short name (smollm2).
        message: message(s) to send non-interactively, in order, as one conversation.
        system: an optional system prompt.
        max_new_tokens: longest reply, in tokens.
        temperature: 0 = greedy; higher = more random.
        top_p: nucleus sampling threshold (1 = off).
        seed: random seed for sampling.
        dtype: float32 or bfloat16.
    """
    import lmforge

    llm = lmforge.load(model, dtype=dtype)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def reply(text: str) -> None:
        history.append({"role": "user", "content": text})
        pieces = []
        for piece in llm.chat(history, stream=True, **kw):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})

    if message:
        for m in message:
            if len(message) > 1:
                print(f"> {m}")
            reply(m)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {llm.config.name}. /exit to quit, /reset to start over.")
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history[:] = start
            continue
        reply(line)
    return 0
