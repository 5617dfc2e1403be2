"""Quantized linear layers (int8, int4, NF4, GGUF blocks, ternary) as drop-in swaps for `nn.Linear`."""

from lmforge.quant.nf4 import NF4_CODE, NF4Linear

__all__ = ["NF4_CODE", "NF4Linear"]
