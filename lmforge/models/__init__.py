"""Model architectures, all driven by `lmforge.config.Config`."""

from lmforge.models.cache import Cache, KVCache
from lmforge.models.decoder import DecoderLM
from lmforge.models.seq2seq import EncoderDecoderLM, make_model

__all__ = ["Cache", "DecoderLM", "EncoderDecoderLM", "KVCache", "make_model"]
