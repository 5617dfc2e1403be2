"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021): learned virtual tokens.

Both live in `model.virtual_tokens`, the one hook the decoder has for them: when it is set (and not
disabled), every forward without a cache starts from a cache the module fills, and `new_cache` (the
generator's) is filled the same way, so training, evaluation and generation all see the virtual tokens.

- Prompt tuning: n embeddings (n, C), run through the frozen model first, as if prepended to the input
  (causal attention makes that the same as prepending): the real tokens see them at positions 0..n-1
  and take positions n, n+1, ... The embeddings start as those of n random vocabulary tokens.
- Prefix tuning: per layer, n learned keys and values (no positions: the input starts at position 0).
  They start as the keys/values the frozen model computes for n random vocabulary tokens.

Packed rows (segment_ids) cannot take virtual tokens; use unpacked batches.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.adapt.lora import AdapterLayer
from lmforge.errors import ConfigError


class GrowingKV:
    """A layer's keys/values kept by concatenation instead of writes into a buffer, for a forward that
    backpropagates: in-place writes into a shared buffer would invalidate what autograd saved."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, nkv, T, hs); return all keys/values so far."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def bytes(self) -> int:
        """Memory held."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class VirtualTokens(AdapterLayer):
    """Base: n virtual tokens that fill a fresh cache (`fill`)."""

    method = "virtual"

    def __init__(self, n: int):
        super().__init__()
        if n < 1:
            raise ConfigError(f"the number of virtual tokens must be >= 1, got {n}")
        self.n = n

    def settings(self) -> dict:
        """What re-creates this module (saved in lmforge_adapter.json)."""
        return {"n": self.n}

    def fill(self, model: nn.Module, cache) -> None:
        """Write the virtual tokens into slots 0..n-1 of an empty cache."""
        raise NotImplementedError

    def start(self, model: nn.Module, batch_size: int, seq_len: int):
        """A cache holding the virtual tokens, for one full forward (training, scoring) of seq_len tokens."""
        from lmforge.models.cache import Cache

        cache = Cache([GrowingKV() for _ in model.blocks], batch_size, self.n + seq_len,
                      model.tok_emb.weight.device)
        self.fill(model, cache)
        return cache

    def merge(self) -> None:
        """Virtual tokens are not weights of the base: nothing to merge into."""
        raise ConfigError(f"{self.method} tuning's virtual tokens cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Nothing to undo (never merged)."""


class PromptTuning(VirtualTokens):
    """n trainable input embeddings, run through the model ahead of the input."""

    method = "prompt"

    def __init__(self, model: nn.Module, n: int, generator: torch.Generator | None = None):
        super().__init__(n)
        emb = model.tok_emb.weight
        ids = torch.randint(0, emb.shape[0], (n,), generator=generator)
        self.prompt = nn.Parameter(emb.detach()[ids].clone())  # (n, C)

    def fill(self, model: nn.Module, cache) -> None:
        B = cache.key_mask.shape[0]
        ids = torch.zeros(B, self.n, dtype=torch.long, device=self.prompt.device)  # shape only
        model.hidden_states(ids, cache=cache, inputs_embeds=self.prompt.unsqueeze(0).expand(B, -1, -1))


class PrefixTuning(VirtualTokens):
    """Per layer, n trainable keys and values (B-independent) placed in front of the input's."""

    method = "prefix"

    def __init__(self, model: nn.Module, n: int, generator: torch.Generator | None = None):
        super().__init__(n)
        vocab = model.tok_emb.weight.shape[0]
        ids = torch.randint(0, vocab, (1, n), generator=generator)
        saved, model.virtual_tokens = getattr(model, "virtual_tokens", None), None
        try:  # initial keys/values: what the frozen model computes for random tokens
            with torch.no_grad():
                cache = model.new_cache(1, max_len=n)
                model(ids, cache=cache)
        finally:
            model.virtual_tokens = saved
        if not cache.k or len(cache.k) != len(cache.layers):
            raise ConfigError("prefix tuning needs attention in every layer (keys and values to prefix)")
        self.prefix_k = nn.Parameter(torch.stack([k[0, :, :n] for k in cache.k]).float().clone())  # (L, nkv, n, hs)
        self.prefix_v = nn.Parameter(torch.stack([v[0, :, :n] for v in cache.v]).float().clone())

    def settings(self) -> dict:
        return {"n": self.n}

    def fill(self, model: nn.Module, cache) -> None:
        B = cache.key_mask.shape[0]
        for i, state in enumerate(cache.layers):
            dt = state.k.dtype if state.k is not None else model.tok_emb.weight.dtype
            k = self.prefix_k[i].unsqueeze(0).expand(B, -1, -1, -1).to(dt)
            v = self.prefix_v[i].unsqueeze(0).expand(B, -1, -1, -1).to(dt)
            state.update(k, v, 0)
        cache.key_mask[:, :self.n] = True
        cache.length = self.n  # next_pos stays 0: the prefix has no position


def _apply(model: nn.Module, module: VirtualTokens) -> nn.Module:
    if getattr(model, "virtual_tokens", None) is not None:
        raise ConfigError("this model already has virtual tokens")
    if any(not hasattr(b.token_mixer, "qkv") for b in model.blocks):
        raise ConfigError("prompt/prefix tuning needs attention in every layer (keys and values to extend)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.virtual_tokens = module
    return model


def apply_prompt_tuning(model: nn.Module, n: int = 20) -> nn.Module:
    """Give `model` n trainable virtual input tokens and freeze the rest; in place."""
    return _apply(model, PromptTuning(model, n))


def apply_prefix_tuning(model: nn.Module, n: int = 20) -> nn.Module:
    """Give every layer of `model` n trainable key/value prefixes and freeze the rest; in place."""
    return _apply(model, PrefixTuning(model, n))
