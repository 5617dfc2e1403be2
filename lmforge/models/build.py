"""Building the model a config describes."""

from __future__ import annotations

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
