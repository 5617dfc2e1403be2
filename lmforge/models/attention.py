"""Kept for imports from before the mixers package: attention lives in `lmforge.models.mixers.attention`."""

from lmforge.models.cache import Cache as KVCache
from lmforge.models.mixers.attention import Attention, KVState, build_mask

__all__ = ["Attention", "KVCache", "KVState", "build_mask"]
