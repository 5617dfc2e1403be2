"""Token mixers and channel mixers: the two halves of every block, each chosen by config.

A block (`lmforge.models.block.Block`) is a **token mixer** (mixes information across positions:
attention, and its alternatives: SSMs, linear attention, RWKV time-mix, retention, LSH and Transformer-XL
attention, the classical LSTM) followed by a **channel mixer** (per position: MLP, mixture of experts, RWKV
channel-mix), with one norm/residual rule around them. `Config.block` ("token+channel") picks the default for
every layer and `Config.layers` (one such string per layer) overrides it, e.g. Jamba's interleaving.

The interface every mixer implements (one file per mixer in this package):

    forward(x, ctx, state) -> y          x, y: (B, T, C)
        ctx:   `MixerContext`, shared by all layers of one forward pass (positions, rope tables,
               attention mask, padding, first slot).
        state: the layer's decode state (see below) or None for a full-sequence pass without cache.
               A mixer reads what its earlier calls left there and advances it by T tokens in place.
    new_state(batch_size, max_len, dtype, device) -> state      (token mixers only)
        One object per layer, held by `lmforge.models.cache.Cache`: `KVState` (keys/values) for
        attention, a fixed-size recurrent state (a `RecurrentState`) for SSM/linear-attention/RWKV/
        RetNet. It offers `bytes() -> int`, `reorder(rows, length)` and `repeat_rows(n)` (beam search);
        the generator never looks inside it.

Channel mixers are called with the same `(x, ctx, state)` (the layer's state, which only stateful
ones such as RWKV channel-mix read). Class attributes: `attr`, the block attribute holding it (its
state-dict prefix, e.g. `blocks.0.attn.`), and `resid_projs`, names of the linears writing back
into the residual stream (scaled at GPT-2 init). A mixer may report an auxiliary loss through `aux_loss`
(a 0-d tensor, or None), which `DecoderLM.aux_loss()` sums for the training objective.

Each mixer may check the settings it reads with a classmethod `check(cfg) -> list[str]` (the problems
found; none when it has no such method): `check_mixers` runs those of the mixers a config uses, and
`DecoderLM` calls it when it builds the blocks.

`lmforge.config.TOKEN_MIXERS` / `CHANNEL_MIXERS` map each config name to its class as "module:Class", imported
on first use (`token_mixer`, `channel_mixer`); a new mixer is its module and one line in that table. The shared
`RecurrentState` and `MixerContext` live in `lmforge.models.mixers.base`.

Left padding: `ctx.pad` is (B, T) bool, True at real tokens, or None when no row is padded. A
recurrent mixer zeroes its input at padding so its state is exactly what the real tokens build.
"""

from __future__ import annotations

import importlib

from lmforge.config import CHANNEL_MIXERS, TOKEN_MIXERS, Config
from lmforge.errors import ConfigError


def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def token_mixer(name: str) -> type:
    """The token mixer class for a config name (a key of `TOKEN_MIXERS`)."""
    return _resolve(TOKEN_MIXERS[name])


def channel_mixer(name: str) -> type | None:
    """The channel mixer class for a config name; None for "none" (the block has no channel mixer, as Mamba's)."""
    path = CHANNEL_MIXERS[name]
    return _resolve(path) if path else None


def mixer_problems(cfg: Config) -> list[str]:
    """What the `check` of each mixer `cfg` uses finds wrong with the settings it reads (each problem once)."""
    used = {name for pair in cfg.layer_mixers() for name in pair}
    classes = [token_mixer(n) for n in TOKEN_MIXERS if n in used]
    classes += [channel_mixer(n) for n in CHANNEL_MIXERS if n in used and CHANNEL_MIXERS[n]]
    problems: list[str] = []
    for cls in classes:
        problems += [p for p in getattr(cls, "check", lambda cfg: [])(cfg) if p not in problems]
    return problems


def check_mixers(cfg: Config) -> Config:
    """Raise `ConfigError` with the first problem `mixer_problems` finds, as `Config.validate` words its own."""
    problems = mixer_problems(cfg)
    if problems:
        raise ConfigError(f"config {cfg.name!r}: {problems[0]}")
    return cfg
