"""Building models: the model a config describes, and empty ones for a loader to fill."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lmforge.config import Config
from lmforge.models.decoder import DecoderLM
from lmforge.models.seq2seq import EncoderDecoderLM


def make_model(cfg: Config, init_weights: bool = True) -> nn.Module:
    """The model for a config: a `DecoderLM`, or an `EncoderDecoderLM` when `cfg.encoder_layers` > 0.

    Both check the config (`Config.validate`) and the settings of the mixers it uses
    (`lmforge.models.mixers.check_mixers`), raising `ConfigError` before anything is allocated.
    """
    return EncoderDecoderLM(cfg, init_weights) if cfg.is_encoder_decoder else DecoderLM(cfg, init_weights)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build modules without random initialisation: their weights are about to be replaced.

    Initialising SmolLM2-135M's weights takes ~3 s on 2 cores, building without it ~0.05 s. Buffers that
    are computed rather than loaded (RoPE tables) are still built normally.
    """
    names = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def empty_model(cfg: Config, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> DecoderLM:
    """A `DecoderLM` whose parameters are allocated but not initialised, for a loader to fill in place.

    Computed buffers (RoPE tables) are real. Tied weights stay tied.
    """
    with no_init(), torch.device(device):
        model = make_model(cfg, init_weights=False)
    if dtype is not None:
        for p in model.parameters():  # swap storage instead of converting uninitialised memory
            p.data = torch.empty(p.shape, dtype=dtype, device=p.device)
    return model.to(dtype=dtype) if dtype is not None else model
