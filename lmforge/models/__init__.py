"""Model architectures, all driven by `lmforge.config.Config`."""

from lmforge.models.cache import Cache, KVCache
from lmforge.models.decoder import DecoderLM

__all__ = ["Cache", "DecoderLM", "KVCache"]
