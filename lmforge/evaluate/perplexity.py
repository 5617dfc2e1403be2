"""Perplexity and bits per byte of a language model on text, with a sliding context window.

Every token after the first is scored exactly once. Targets are taken `stride` at a time; each chunk
is scored by one forward pass over the `max_length` tokens that end just before its last target, so
every target sees at least `max_length - stride` tokens of context (all of them near the start). This
is the "sliding window" strategy of the Hugging Face perplexity guide, except that no target is dropped
at window edges.

Bits per byte (nats / ln 2 / UTF-8 bytes) does not depend on the tokenizer, so models with different
vocabularies can be compared on the same text; perplexity per token cannot.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError

_LOGIT_ROWS = 512  # score this many positions at a time: a 49k-vocab fp32 logit row is 196 KB


@dataclass
class PerplexityResult:
    """What `perplexity` measured. `nll` is the mean negative log-likelihood per scored token in nats."""

    perplexity: float
    nll: float
    bits_per_byte: float
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text those tokens spell
    documents: int
    max_length: int
    stride: int
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.3f} | {self.bits_per_byte:.4f} bits/byte | nll {self.nll:.4f} "
                f"nats/token | {self.tokens:,} tokens, {self.bytes:,} bytes, {self.documents} document(s) | "
                f"context {self.max_length}, stride {self.stride} | {self.seconds:.1f} s")


def sliding_nll(model: torch.nn.Module, ids: list[int], max_length: int, stride: int,
                on_chunk: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(sum of negative log-likelihoods in nats, number of tokens scored) for tokens 1..n-1 of `ids`.

    `model` maps (1, T) ids to (1, T, vocab) logits; a `DecoderLM` is run through `hidden_states` and its
    LM head only on the positions being scored. `on_chunk(n)` is called after each chunk of n targets.
    """
    if max_length < 1 or not 1 <= stride <= max_length:
        raise ConfigError(f"need max_length >= 1 and 1 <= stride <= max_length, got max_length={max_length}, "
                          f"stride={stride}")
    p = next(model.parameters(), None)  # an n-gram model has counts, no parameters: it runs on the CPU
    seq = torch.tensor(ids, dtype=torch.long, device=p.device if p is not None else "cpu")
    total, n, s = 0.0, len(ids), 1
    while s < n:
        t = min(s + stride, n)  # targets s..t-1
        b = max(0, t - 1 - max_length)  # context window ids[b : t-1], at most max_length tokens
        x = seq[b:t - 1].unsqueeze(0)
        with torch.inference_mode():
            if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
                h = model.hidden_states(x)[0, s - 1 - b:]  # (t-s, C): the positions predicting s..t-1
                head = model.lm_head
            else:
                h, head = model(x)[0, s - 1 - b:], (lambda z: z)
            for i in range(0, t - s, _LOGIT_ROWS):
                logits = head(h[i:i + _LOGIT_ROWS]).float()
                total += F.cross_entropy(logits, seq[s + i:min(s + i + _LOGIT_ROWS, t)], reduction="sum").item()
        if on_chunk is not None:
            on_chunk(t - s)
        s = t
    return total, max(n - 1, 0)


def perplexity(llm, texts: str | Iterable[str], max_length: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity and bits per byte of `llm` (an `lmforge.LLM`) on a text or several documents.

    Args:
        texts: one string, or documents scored separately (each starts with a fresh context).
        max_length: context window; default the model's block size.
        stride: targets per forward pass; default max_length // 2 (each target sees >= half a window).
        max_tokens: score at most this many tokens in all (the first ones, in document order).
        progress: show a progress bar with tokens/s and ETA on stderr.
    """
    tok = llm.tokenizer
    if tok is None:
        raise ConfigError("perplexity needs a tokenizer; load a model folder or pass tokenizer=<folder>")
    cfg = getattr(llm.model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        # left-to-right perplexity of one text has no source to condition on; a seq2seq model is scored on
        # target tokens given an input, which this eval does not do
        raise ConfigError(f"{cfg.name!r} is an encoder-decoder: perplexity here scores a causal LM's text left to "
                          "right. Score a target given its input with the model's own logits "
                          "(llm.model(input_ids, decoder_input_ids=...)) and cross-entropy, or evaluate a decoder")
    if getattr(getattr(cfg, "attention", None), "causal", True) is False:
        # a bidirectional model sees the very token it would predict: any number it gave would mean nothing
        raise ConfigError(f"{cfg.name!r} is a bidirectional encoder: it sees every token, so it has no "
                          "left-to-right perplexity; use llm.embed for sentence embeddings or evaluate a causal LM")
    block = llm.config.block_size
    max_length = max_length or block
    if max_length > block:
        raise ConfigError(f"max_length {max_length} exceeds the model's context of {block} tokens")
    stride = stride or max(1, max_length // 2)
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2, got {max_tokens}")
    docs = [texts] if isinstance(texts, str) else list(texts)
    encoded = []
    budget = max_tokens
    for text in docs:
        if hasattr(tok, "normalize"):  # teenyGPT's characters: the model only knows a-z and space
            text = tok.normalize(text)
        ids = tok.encode(text, add_special_tokens=True)
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        if len(ids) >= 2:
            encoded.append(ids)
        if budget is not None and budget < 2:
            break
    if not encoded:
        raise ConfigError("no text to score: every document is shorter than two tokens")
    n_targets = sum(len(ids) - 1 for ids in encoded)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_targets, unit="tok", desc="perplexity", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    nll, count, n_bytes = 0.0, 0, 0
    was_training = llm.model.training
    llm.model.eval()
    try:
        for ids in encoded:
            s, c = sliding_nll(llm.model, ids, max_length, stride, bar.update if bar else None)
            nll, count = nll + s, count + c
            # bytes the scored tokens spell: the whole decoded text less the first, unscored, token
            n_bytes += _utf8_len(tok, ids) - _utf8_len(tok, ids[:1])
    finally:
        llm.model.train(was_training)
        if bar is not None:
            bar.close()
    mean = nll / count
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
                            tokens=count, bytes=n_bytes, documents=len(encoded), max_length=max_length,
                            stride=stride, seconds=time.perf_counter() - t0)


def _utf8_len(tok, ids: list[int]) -> int:
    return len(tok.decode(ids, skip_special_tokens=True).encode("utf-8"))
