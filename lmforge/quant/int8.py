"""Per-output-channel int8 layers (`Int8Linear`) and the probes of their two kernels.

Several rows multiply with `aten._weight_int8pack_mm` on bf16 activations (`probe_int8`); a single fp32 row
(batch-1 decode) multiplies in integers through fbgemm's `quantized::linear_dynamic` where `probe_int8_integer`
found it exact, with 8- or 7-bit activations. Otherwise the layer dequantizes and calls `F.linear`
(`QuantLinear.forward`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.quant.linear import QuantLinear


class Int8Linear(QuantLinear):
    """Per-output-channel symmetric int8 weights: value = q * scale[row], q in -127..127.

    A single fp32 row (batch-1 decode) multiplies as llama.cpp's Q8_0 does, in integers: the row is quantized
    to 8 bits on the fly (its own scale and zero point) and fbgemm's int8 GEMM (`quantized::linear_dynamic`,
    AVX-512 VNNI) does the rest, from a copy of the weights prepacked once (the int8 bytes again: 135 MB for
    SmolLM2). Measured in one process on 2 cores (busy machine, interleaved): 3072 x 576 23 us vs 53 us for the
    bf16 kernel, the 49152 x 576 LM head 0.64 ms vs 2.0 ms. Several rows (prefill, batches) keep the bf16 kernel,
    since fbgemm's dynamic quantization takes one scale for all rows of a call.
    """

    method = "int8"
    fast_path = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_dtype=torch.float32):
        super().__init__(in_features, out_features, bias, bias_dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features))
        self._bf16_scales: tuple | None = None
        self._w8a8: tuple | None = None  # (key, fbgemm packed weight or None when unavailable)
        self._reduce_range = False  # 7-bit activations, where the probe found 8-bit ones overflow

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an `nn.Linear` to int8, one absmax scale per output row."""
        w = linear.weight.detach().float()
        b = linear.bias
        layer = cls(linear.in_features, linear.out_features, b is not None,
                    b.dtype if b is not None else torch.float32).to(w.device)
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        layer.qweight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scales.copy_(scale)
        if b is not None:
            layer.bias.data.copy_(b.detach())
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of the float weight, (*rows.shape, in_features)."""
        return (self.qweight[rows].float() * self.scales[rows][..., None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.numel() != self.in_features or x.device.type != "cpu"
                or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            return super().forward(x)
        packed = self._packed_w8a8()
        if packed is None:
            return super().forward(x)
        y = torch.ops.quantized.linear_dynamic(x.reshape(1, -1), packed, self._reduce_range)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _packed_w8a8(self):
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales._version)
        if self._w8a8 is None or self._w8a8[0] != key:
            choice = probe_int8_integer()
            self._reduce_range = bool(choice.detail)
            self._w8a8 = (key, _fbgemm_pack(self.qweight, self.scales) if choice.fast else None)
        return self._w8a8[1]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self._bf16_scales is not None:  # built by an eager call before
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self._bf16_scales[1])
        key = (self.scales.data_ptr(), self.scales._version)
        if self._bf16_scales is None or self._bf16_scales[0] != key:
            self._bf16_scales = (key, self.scales.to(torch.bfloat16))
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self._bf16_scales[1])


def _probe_int8() -> kernels.Choice:
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (96, 64), generator=gen, dtype=torch.int8)
    scales = torch.rand(96, generator=gen) * 0.02 + 0.001
    x = torch.randn(5, 64, generator=gen)
    ref = F.linear(x, q.float() * scales[:, None])
    sb = scales.to(torch.bfloat16)

    def fast():
        mm = torch.ops.aten._weight_int8pack_mm
        return torch.cat([mm(x[:1].bfloat16(), q, sb), mm(x[1:].bfloat16(), q, sb)]).float()

    return kernels.compare("int8", "aten._weight_int8pack_mm (bf16 activations)", fast, ref,
                           2 * kernels.eps(torch.bfloat16), "reference: dequantize + F.linear")


def probe_int8() -> kernels.Choice:
    """How int8 layers multiply several rows here: torch's int8 kernel, or the dequantized reference."""
    return kernels.choose("int8", _probe_int8)


def _simulated_w8a8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """What an exact integer GEMM gives for one row x quantized to `levels` + 1 levels (asymmetric, the range
    widened to hold 0, round half to even) times int8 weights with per-row scales, in fp64."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = (hi - lo) / levels if hi > lo else 1.0
    zp = min(max(round(-lo / s), 0), levels)
    xq = (torch.round(x.double() / s) + zp).clamp(0, levels)
    return ((xq - zp) * s) @ (q.double() * scales.double()[:, None]).T


def _probe_int8_integer() -> kernels.Choice:
    # A case that overflows 16-bit pair sums where a kernel keeps them (fbgemm's AVX2 path without VNNI):
    # large positive activations (8-bit codes near 255) against weights of 127. 7-bit activations
    # (`reduce_range`, 127 * 127 * 2 < 2^15) cannot overflow; the result is then an exact integer product,
    # so the probe compares with its simulation to fp32 rounding.
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 256), generator=gen, dtype=torch.int8)
    q[:8] = 127
    scales = torch.rand(64, generator=gen) * 0.01 + 0.001
    x = torch.randn(1, 256, generator=gen)
    x[0, :64] = 4.0
    packed = _fbgemm_pack(q, scales)
    if packed is None:
        return kernels.Choice("int8_integer", "aten._weight_int8pack_mm (bf16 activations)", False,
                              "this PyTorch build has no fbgemm int8 kernel")
    tol = 64 * kernels.eps(torch.float32)
    first = None
    for reduce_range, levels in ((False, 255), (True, 127)):
        ref = _simulated_w8a8(x, q, scales, levels).float()
        name = f"fbgemm quantized::linear_dynamic, {8 - reduce_range}-bit activations"
        c = kernels.compare("int8_integer", name,
                            lambda rr=reduce_range: torch.ops.quantized.linear_dynamic(x, packed, rr), ref, tol,
                            "aten._weight_int8pack_mm (bf16 activations)", detail=reduce_range)
        if c.fast:
            if first is not None:
                c.reason += f"; 8-bit activations did not ({first.reason})"
            return c
        first = first or c
    return first


def probe_int8_integer() -> kernels.Choice:
    """Whether one fp32 row multiplies int8 weights in integers here (fbgemm, with 8- or 7-bit activations:
    `detail` is fbgemm's reduce_range), or takes the bf16-activation kernel."""
    return kernels.choose("int8_integer", _probe_int8_integer)


def _fbgemm_pack(q: torch.Tensor, scales: torch.Tensor):
    """int8 weights (N, K) with per-row scales, prepacked for `quantized::linear_dynamic`; None where that
    kernel is missing (a build without fbgemm, or once PyTorch drops its deprecated quantized tensors)."""
    if q.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated; this one only feeds the prepack
            warnings.simplefilter("ignore")
            w = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales, dtype=torch.long),
                                                         0)
            return torch.ops.quantized.linear_prepack(w, None)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
