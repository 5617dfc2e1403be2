"""Model architectures, all driven by `lmforge.config.Config`."""

from lmforge.models.attention import KVCache
from lmforge.models.decoder import DecoderLM

__all__ = ["DecoderLM", "KVCache"]
