"""Autoregressive generation: one engine for greedy and sampled decoding, batches and streaming.

The model runs once over the (left-padded) prompts to fill a preallocated KV cache, then once per
new token with a single position per row. Sampling happens on fp32 logits of the last position only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import ConfigError
from lmforge.infer.packed import blas_decode, pack_linears
from lmforge.models import DecoderLM


@dataclass
class GenerationConfig:
    """How to pick each next token and when to stop.

    temperature 0 means greedy (arg-max). top_k 0 and top_p 1.0 switch those filters off.
    repetition_penalty > 1 discourages tokens already in the prompt or output (Keskar et al. 2019).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    stop_at_eos: bool = True
    truncate: bool = False  # keep the last tokens of a prompt longer than the context instead of failing

    def validate(self) -> GenerationConfig:
        """Reject values that have no meaning, naming the allowed range."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        return self


def sample_next(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V). `seen` (B, V) bool marks tokens to penalise."""
    logits = logits.float()
    if seen is not None and gen.repetition_penalty != 1.0:
        p = gen.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if gen.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / gen.temperature
    if gen.top_k and gen.top_k < logits.shape[-1]:
        kth = torch.topk(logits, gen.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        drop = probs.cumsum(dim=-1) - probs >= gen.top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def prepare_prompts(prompts: list[list[int]], block_size: int, gen: GenerationConfig, pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-pad token lists into (B, T) ids and a (B, T) mask (None when no row is padded)."""
    rows = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError("empty prompt: there is nothing to condition on (this tokenizer adds no BOS "
                              "token); give some text")
        if len(p) > block_size:
            if not gen.truncate:
                raise ConfigError(f"prompt {i} has {len(p)} tokens but the model's context is {block_size}; "
                                  "shorten it or pass truncate=True (--truncate) to keep its last tokens")
            p = p[-block_size:]
        rows.append(p)
    T = max(len(p) for p in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, (None if bool(mask.all()) else mask)


@torch.inference_mode()
def iter_tokens(model: DecoderLM, prompts: list[list[int]], gen: GenerationConfig,
                eos_ids: Sequence[int] = (), pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) LongTensor, until max_new_tokens or the context is full.

    Rows that produced an EOS keep yielding `pad_id`. The caller decides about stop strings and may
    simply stop iterating.
    """
    gen.validate()
    cfg = model.config
    device = model.tok_emb.weight.device
    pack_linears(model)  # CPU: multiply from prepacked weights (no-op elsewhere and when done before)
    ids, mask = prepare_prompts(prompts, cfg.block_size, gen, pad_id)
    B, T = ids.shape
    steps = min(gen.max_new_tokens, cfg.block_size - T)
    if steps <= 0:
        return
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    generator = None
    if gen.temperature > 0:
        generator = torch.Generator(device=device)
        if gen.seed is not None:
            generator.manual_seed(gen.seed)
        else:
            generator.seed()
    seen = None
    if gen.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for i in range(B):
            seen[i, ids[i] if mask is None else ids[i][mask[i].bool()]] = True
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device) if gen.stop_at_eos else None
    done = torch.zeros(B, dtype=torch.bool, device=device)

    fp32_cpu = (device.type == "cpu" and model.tok_emb.weight.dtype == torch.float32
                and not getattr(model, "quantization", None))  # quantized layers use torch's threads
    cache = model.new_cache(B, max_len=T + steps)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]  # (B, V)
    for step in range(steps):
        nxt = sample_next(logits, gen, generator, seen)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        yield nxt
        if eos is not None and eos.numel():
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                return
        if step + 1 < steps:
            with blas_decode(fp32_cpu):
                logits = model(nxt[:, None], cache=cache, logits_to_keep=1)[:, -1]


def generate_ids(model: DecoderLM, prompts: list[list[int]], gen: GenerationConfig,
                 eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """New tokens for every prompt (EOS included when it ended the row, padding excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    eos = set(eos_ids) if gen.stop_at_eos else set()
    for nxt in iter_tokens(model, prompts, gen, eos_ids, pad_id):
        for i, t in enumerate(nxt.tolist()):
            if not finished[i]:
                out[i].append(t)
                finished[i] = t in eos
    return out


class TextStream:
    """Turns a growing list of token ids into text pieces: holds back incomplete UTF-8 sequences
    (which decode to U+FFFD) and text that might be the start of a stop string."""

    def __init__(self, decode, stop: Sequence[str]):
        self.decode, self.stop = decode, list(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = min((i for s in self.stop if (i := self.text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = self.text.rfind("\ufffd")
            while safe > 0 and self.text[safe - 1] == "\ufffd":
                safe -= 1
        for s in self.stop:  # hold back a suffix that could grow into a stop string
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if s.startswith(self.text[-k:]):
                    safe = min(safe, len(self.text) - k)
                    break
        piece = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        """Everything not yet shown."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
