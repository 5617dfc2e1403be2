"""Quantized linear layers (int8, int4, NF4, GGUF Q8_0/Q4_0/Q4_1) as drop-in swaps for `nn.Linear`.

`quantize(model, method)` swaps a model's linears in place; `LLM.quantize(method)` returns a quantized copy.
`NF4Linear` (nf4.py) is also QLoRA's frozen base.
"""

from lmforge.quant.int8 import Int8Linear
from lmforge.quant.linear import Int4Linear, Q8Linear, QuantEmbedding, QuantLinear
from lmforge.quant.model import METHODS, dequantize, is_quantized, quantize
from lmforge.quant.nf4 import NF4_CODE, NF4Linear

__all__ = ["METHODS", "NF4_CODE", "Int4Linear", "Int8Linear", "NF4Linear", "Q8Linear", "QuantEmbedding",
           "QuantLinear", "dequantize", "is_quantized", "quantize"]
