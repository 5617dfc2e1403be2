"""Model architectures, all driven by `lmforge.config.Config`."""

from lmforge.models.build import make_model
from lmforge.models.cache import Cache
from lmforge.models.decoder import DecoderLM
from lmforge.models.seq2seq import EncoderDecoderLM

__all__ = ["Cache", "DecoderLM", "EncoderDecoderLM", "make_model"]
