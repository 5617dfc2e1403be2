"""Before / after numbers for a model transformation: parameters, perplexity, decode speed."""

from __future__ import annotations

import time
from typing import Any

import torch

from lmforge.compress.prune import sparsity_report


def held_out_text(source: str = "shakespeare", split: str = "test", max_chars: int = 20000) -> str:
    """The first `max_chars` characters of a corpus split (the embedded corpus's test plays by default)."""
    from lmforge.data import iter_documents

    out, n = [], 0
    for doc in iter_documents(source, split):
        out.append(doc[:max_chars - n])
        n += len(out[-1])
        if n >= max_chars:
            break
    return "\n".join(out)


def measure(llm, text: str, max_tokens: int = 4096, new_tokens: int = 32, prompt: str = "The ") -> dict[str, Any]:
    """{"params", "nonzero", "sparsity", "ppl", "bits_per_byte", "decode_tok_s"} of an `LLM`.

    Perplexity over the first `max_tokens` tokens of `text`; speed from greedy decoding of `new_tokens`
    tokens at batch 1 (wall clock: depends on how busy the machine is).
    """
    from lmforge.evaluate.perplexity import perplexity

    out: dict[str, Any] = dict(sparsity_report(llm.model))
    ppl = perplexity(llm, text, max_tokens=max_tokens)
    out.update(ppl=round(ppl.perplexity, 3), bits_per_byte=round(ppl.bits_per_byte, 4))
    from lmforge.infer.generate import GenerationConfig, generate_ids

    ids = [llm.encode_prompt(prompt) or [0]]
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    generate_ids(llm.model, ids, GenerationConfig(max_new_tokens=2, temperature=0))  # warm-up
    t0 = time.perf_counter()
    n = len(generate_ids(llm.model, ids, gen)[0])
    out["decode_tok_s"] = round(n / max(time.perf_counter() - t0, 1e-9), 1)
    out["threads"] = torch.get_num_threads()
    return out


def print_comparison(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    """A small before/after table on stdout."""
    print(f"{what}:")
    print(f"  {'':14s} {'before':>14s} {'after':>14s}")
    for k in ("params", "nonzero", "ppl", "bits_per_byte", "decode_tok_s"):
        if k in before and k in after:
            fmt = (lambda v: f"{v:,}") if isinstance(before[k], int) else (lambda v: f"{v:.4g}")
            print(f"  {k:14s} {fmt(before[k]):>14s} {fmt(after[k]):>14s}")
