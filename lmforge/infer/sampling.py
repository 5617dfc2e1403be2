"""What every decoding strategy shares: the settings (`GenerationConfig`), how logits become the next
token (`sample_next`, `filter_logits`) and how prompts become a left-padded batch (`prepare_prompts`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import ConfigError


@dataclass
class GenerationConfig:
    """How to pick each next token and when to stop.

    temperature 0 means greedy (arg-max). top_k 0 and top_p 1.0 switch those filters off.
    repetition_penalty > 1 discourages tokens already in the prompt or output (Keskar et al. 2019).

    Beam search (num_beams > 1) is deterministic and ignores the sampling settings; length_penalty is the
    exponent of the length that divides a finished beam's summed log-probability, early_stopping (True,
    False or "never") when the search may end, as in `transformers`; num_return_sequences of the best
    beams are returned. Speculative decoding (prompt_lookup > 0, or a draft model given to the generator)
    proposes draft_tokens tokens per step; prompt_lookup is the longest n-gram matched in the context.

    compile runs each decode step through `torch.compile` (`lmforge.infer.compiled`): faster per token
    after a one-off compilation, and close to but not bit-identical with the eager step; plain greedy and
    sampled decoding only.
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
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    prompt_lookup: int = 0
    draft_tokens: int = 5
    compile: bool = False

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
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ConfigError(f"num_beams must be an integer >= 1 (1 = no beam search), got {self.num_beams!r}")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            raise ConfigError(f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                              f"got {self.num_return_sequences!r}")
        if not math.isfinite(self.length_penalty):
            raise ConfigError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if isinstance(self.prompt_lookup, bool) or not isinstance(self.prompt_lookup, int) or self.prompt_lookup < 0:
            raise ConfigError(f"prompt_lookup must be the longest n-gram to match, an integer >= 0 (0 = off), "
                              f"got {self.prompt_lookup!r}")
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise ConfigError(f"draft_tokens must be an integer >= 1, got {self.draft_tokens!r}")
        if self.compile and (self.num_beams > 1 or self.prompt_lookup):
            raise ConfigError("compile applies to plain greedy or sampled decoding, not to beam search or "
                              "speculative decoding; drop compile=True or those options")
        if self.num_beams > 1 and self.prompt_lookup:
            raise ConfigError("beam search and speculative decoding cannot be combined; choose one")
        return self


def filter_logits(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits (B, V) after the repetition penalty, temperature, top-k and top-p (removed tokens at -inf):
    their softmax is the distribution `sample_next` draws from. For temperature > 0."""
    logits = logits.float()
    if seen is not None and gen.repetition_penalty != 1.0:
        p = gen.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
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
    return logits


def sample_next(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V). `seen` (B, V) bool marks tokens to penalise."""
    if gen.temperature == 0:
        logits = logits.float()
        if seen is not None and gen.repetition_penalty != 1.0:
            p = gen.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, gen, seen).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def make_generator(gen: GenerationConfig, device: torch.device | str) -> torch.Generator | None:
    """The sampling RNG: None for greedy, seeded by `gen.seed`, or freshly seeded when there is none."""
    if gen.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if gen.seed is not None:
        generator.manual_seed(gen.seed)
    else:
        generator.seed()
    return generator


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
