"""Parameter-efficient adaptation as module swaps on the one model (LoRA and its family; see lora.py)."""

from lmforge.adapt.config import METHODS, AdapterConfig

__all__ = ["METHODS", "AdapterConfig"]
