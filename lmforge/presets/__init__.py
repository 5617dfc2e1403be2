"""Named presets: one table of every model lmforge knows by name, and `get_preset` / `list_presets` over it.

The presets are built by three tables, each citing where its numbers come from: the dense decoders
(`lmforge.presets.decoders`), the block families beyond dense attention (`lmforge.presets.families`: MoE, SSMs,
linear attention, RetNet, RWKV, LSTM, LSH, Transformer-XL, hybrids) and the encoders and encoder-decoders
(`lmforge.presets.encoders`: BERT, RoBERTa, MiniLM, T5, the Transformer). The order of `PRESETS` is the order
`list_presets` gives.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.presets.decoders import DECODER_PRESETS
from lmforge.presets.encoders import ENCODER_PRESETS
from lmforge.presets.families import FAMILY_PRESETS

PRESETS: dict[str, Callable[[], Config]] = {**DECODER_PRESETS, **FAMILY_PRESETS, **ENCODER_PRESETS}


def list_presets() -> list[str]:
    """Names of all presets."""
    return list(PRESETS)


def get_preset(name: str) -> Config:
    """A fresh `Config` for a named preset; an unknown name raises `ConfigError` naming the nearest ones."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Available presets: {', '.join(PRESETS)}")
    return PRESETS[name]().validate()
