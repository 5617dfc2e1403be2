"""The inference stage's commands: `lmforge generate`, `lmforge chat` and `lmforge embed`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

from lmforge.data.texts import read_texts
from lmforge.errors import ConfigError


def generate(prompt: list[str], model: str = "runs/quickstart/model", max_new_tokens: int = 128,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop: list[str] | None = None, seed: int | None = None, dtype: str = "float32",
             truncate: bool = False, stream: bool = True, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: Literal["false", "true", "never"] = "false", num_return_sequences: int = 1,
             draft: str | None = None, prompt_lookup: int = 0, draft_tokens: int = 5, compile: bool = False) -> int:
    """Continue one or more prompts with a model and print the text.

    Several prompts run as one left-padded batch. Examples:
    lmforge generate "ROMEO:" --model runs/quickstart/model --temperature 0.8 --seed 0
    lmforge generate "The capital of France is" --model smollm2 --num-beams 4 --num-return-sequences 2
    lmforge generate "Rewrite: ..." --model smollm2 --temperature 0 --prompt-lookup 3

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
        stream: print text as it is generated (one prompt only; not with beam search).
        num_beams: beam search with this many beams (1 = off; deterministic, ignores sampling settings).
        length_penalty: beam search: a finished beam scores sum(log p) / length ** length_penalty.
        early_stopping: beam search: true = stop once num_beams beams finished; false = once no running
          beam can beat them at its current length; never = ... at the longest length.
        num_return_sequences: beam search: print this many best beams per prompt.
        draft: speculative decoding with this smaller model of the same tokenizer as the draft.
        prompt_lookup: speculative decoding that drafts by copying from the context, matching n-grams up
          to this long (0 = off; 3 is a good choice).
        draft_tokens: speculative decoding: tokens drafted per step.
        compile: torch.compile the decode step (compiles once, then faster per token; close to, not
          bit-identical with, the default eager decoding).
    """
    import lmforge

    llm = lmforge.load(model, dtype=dtype)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, stop=stop, seed=seed, truncate=truncate,
              num_beams=num_beams, length_penalty=length_penalty, num_return_sequences=num_return_sequences,
              early_stopping={"false": False, "true": True}.get(early_stopping, early_stopping),
              draft=lmforge.load(draft, dtype=dtype) if draft else None, prompt_lookup=prompt_lookup,
              draft_tokens=draft_tokens, compile=compile)
    if num_beams > 1 and num_return_sequences > 1:
        outs = llm.generate(prompt, **kw)
        for p, beams in zip(prompt, outs):
            for i, o in enumerate(beams, 1):
                print(f"[{i}] {p}{o}")
            print("-" * 40)
        return 0
    if stream and len(prompt) == 1 and num_beams == 1:
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


def embed(texts: list[str] | None = None, model: str = "minilm", file: str | None = None,
          out: str = "embeddings.npy", batch_size: int = 32, pooling: Literal["mean", "cls"] = "mean",
          normalize: bool = True, truncate: bool = False, dtype: Literal["float32", "bfloat16"] = "float32") -> str:
    """Embed sentences with an encoder model and write them as .npy or JSONL.

    Args:
        texts: sentences to embed (--texts "first" "second"), or use --file.
        model: model folder or short name (default: minilm, all-MiniLM-L6-v2).
        file: a text file with one sentence per line, or a .jsonl file with a "text" field per line.
        out: output path: .npy (an N x d float32 array) or .jsonl ({"text", "embedding"} per line).
        batch_size: sentences per forward pass.
        pooling: mean over tokens, or the first ([CLS]) token.
        normalize: scale each embedding to unit length.
        truncate: cut inputs longer than the model's context instead of stopping with an error.
        dtype: the weights' precision. bfloat16 is about 2x faster on CPUs with AMX (all-MiniLM-L6-v2 at batch
            1, Xeon, bench/encode.py) and stays within ~3e-3 of float32 (cosine >= 0.9999); output is float32.
    """
    import numpy as np

    import lmforge

    path = Path(out)
    if path.suffix not in (".npy", ".jsonl"):
        raise ConfigError(f"--out must end in .npy or .jsonl, got {out!r}")
    items = list(texts or [])
    if file:
        items += read_texts(file, lines=True)
    if not items:
        raise ConfigError("nothing to embed: give sentences with --texts or a file with --file")
    llm = lmforge.load(model, dtype=dtype)
    vecs = llm.embed(items, batch_size=batch_size, pooling=pooling, normalize=normalize, truncate=truncate,
                     progress=len(items) > 100)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, vecs)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for t, v in zip(items, vecs):
                f.write(json.dumps({"text": t, "embedding": [float(x) for x in v]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"wrote {len(items)} embeddings of size {vecs.shape[1]} to {path}")
    return str(path)
