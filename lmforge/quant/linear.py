"""Weight-only quantized linear layers that multiply with PyTorch's packed CPU kernels.

Three layers, each a drop-in for `nn.Linear` (`in_features`, `out_features`, `bias`, `forward`), each with
`from_linear(linear, ...)` and `dequantize(dtype)` (the float weight it stands for):

- `Int8Linear` (in `lmforge.quant.int8`, with its probes): per-output-channel symmetric int8,
  value = q * scale[row].
- `Int4Linear`: group-wise asymmetric 4-bit (groups of 32/64/128 along the input), value = q * scale + min,
  q in 0..15, scale and min in fp16: exactly GGUF's Q4_1 block when the group is 32 (Q4_0 is min = -8 scale).
- `Q8Linear`: GGUF's Q8_0, blocks of 32 int8 with one fp16 scale, value = q * d.

Kernels (torch 2.13, CPU, 2 cores, batch 1, one 3072 x 576 weight; bench/quant.py has whole models):
fp32 `F.linear` 120 us, `aten._weight_int8pack_mm` 47 us with bf16 activations but 500 us with fp32 ones,
`aten._weight_int4pack_mm_for_cpu` 45 us (bf16) vs 7-9 ms (fp32), a plain dequantize-then-matmul 580 us.
`_dyn_quant_matmul_4bit` needs KleidiAI (Arm) and is not built here. So the layers multiply in bf16
(activations cast to bf16 and back: relative error ~2^-8 on top of the weights' own) and keep a
dequantize-then-`F.linear` path for gradients (QLoRA, QAT) and for other devices.

`_weight_int4pack_mm_for_cpu` computes (u - 8) * s + z for a 4-bit u, with a (K/g, N, 2) bf16 table of
(s, z), from weights in a byte layout that depends on the CPU build it runs (`lmforge.quant.int4_layout`, found by
`probe_int4`). `pack_int4` / `unpack_int4` write and read that layout directly, so the stored bytes are the
kernel's and nothing is held twice; N is padded to a multiple of 64 with zero rows. Q8Linear splits each
int8 q into 16 h + l (h = q >> 4 in -8..7, l in 0..15) and multiplies twice with the 4-bit kernel:
(h+8 - 8) * 16d and (l - 8) * d + 8d. Each fast kernel is used only after its probe passed on this machine
(`lmforge.kernels`); otherwise the layer dequantizes and calls `F.linear`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels
from lmforge.errors import ConfigError
from lmforge.quant.int4_layout import _rows64, pack_int4, unpack_int4, unpack_int4_rows

GROUP_SIZES = (32, 64, 128)


class QuantLinear(nn.Module):
    """Shared part of the quantized linears: shape, frozen bias, the float fallback and the fast path."""

    method = ""
    fast_path = ""  # the `lmforge.kernels` path whose probe must pass before `_matmul` is used

    def __init__(self, in_features: int, out_features: int, bias: bool, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self._fast: bool | None = None  # the probe's verdict, read once per layer (a plain bool for compile)
        self._fast_rows: bool | None = None  # the kernel beats dequantize + F.linear for many rows (measured)

    def _use_fast(self, rows: int = 1) -> bool:
        if self._fast is None:
            self._fast = kernels.fast(self.fast_path)
        if rows > _MANY_ROWS and self._fast:
            if self._fast_rows is None:
                r = kernels.remembered(f"{self.method}_many_rows", lambda: _time_many_rows(type(self)))
                self._fast_rows = r["kernel_us"] <= r["dequantize_us"]
            return self._fast_rows
        return self._fast

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover - abstract
        """The float weight (out_features, in_features) this layer multiplies by."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """x (M, K) bf16 -> (M, N) bf16 with the packed kernel."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad) or not x.is_floating_point()
                or not self._use_fast(x.numel() // x.shape[-1])):
            b = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, self.dequantize(x.dtype), b)
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])
        y = self._matmul(x if dtype == torch.bfloat16 else x.to(torch.bfloat16))
        if dtype != torch.bfloat16:
            y = y.to(dtype)
        if self.bias is not None:
            y = y + (self.bias if self.bias.dtype == dtype else self.bias.to(dtype))
        return y.view(*shape[:-1], self.out_features)

    def logits(self, x: torch.Tensor, top: int = 16) -> torch.Tensor:
        """This layer as an LM head: `forward`, then each row's `top` highest outputs computed again in fp32
        from the dequantized weight rows. The packed kernels round their output to bf16, 2^-8 relative: steps
        of 0.125 at a logit of 25, coarser than the gap between a model's two best tokens often is (SmolLM2's
        "The" and "L" after "What is the capital of France?" are 0.08 apart), so greedy decoding would pick
        among ties that differ by CPU. Recomputed, the best tokens rank as the dequantized model ranks them."""
        y = self(x)
        rows_of = getattr(self, "dequantize_rows", None)
        if y.dtype != torch.float32 or rows_of is None or (torch.is_grad_enabled() and x.requires_grad):
            return y
        flat_y, flat_x = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
        k = min(top, self.out_features)
        for i in range(0, flat_y.shape[0], 64):  # bounds the dequantized rows held at once
            idx = flat_y[i:i + 64].topk(k, dim=-1).indices  # (m, k)
            exact = torch.einsum("mkc,mc->mk", rows_of(idx), flat_x[i:i + 64])
            if self.bias is not None:
                exact = exact + self.bias.float()[idx]
            flat_y[i:i + 64].scatter_(1, idx, exact)
        return y

    def quant_info(self) -> dict:
        """What `lmforge.quant.quantize` records in the model folder to rebuild this layer."""
        return {"method": self.method}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Above this many rows (prefill, batches, perplexity) a kernel must also be faster than dequantizing and
# multiplying in fp32, as measured once per machine: PyTorch's generic (`default`) int4 kernel is correct but
# scalar, and took 541 s for a SmolLM2 perplexity that the dequantize path computes in 8.5 s (AMD EPYC,
# ATEN_CPU_CAPABILITY=default). One row (decode) always takes the kernel: it reads 4-8x fewer bytes.
_MANY_ROWS = 16


def _time_many_rows(cls: type[QuantLinear]) -> dict:
    """Microseconds for 64 rows times a 1536 x 576 layer of `cls`: its kernel, and dequantize + `F.linear`."""
    with torch.inference_mode(False), torch.no_grad():  # the first many-row call may come from inference mode
        return _time_layer(cls)


def _time_layer(cls: type[QuantLinear]) -> dict:
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1536, 576, generator=gen) * 0.05)
    layer = cls.from_linear(lin)
    x = torch.randn(64, 576, generator=gen)
    xb = x.bfloat16()
    paths = {"kernel_us": lambda: layer._matmul(xb), "dequantize_us": lambda: F.linear(x, layer.dequantize())}
    best = {}
    for name, fn in paths.items():
        fn()
        t_end, best[name] = time.perf_counter() + 0.05, float("inf")
        for _ in range(5):  # best of up to 5 calls within ~50 ms (one slow call is answer enough)
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t) * 1e6)
            if time.perf_counter() > t_end:
                break
    return {k: round(v, 1) for k, v in best.items()}


class _Int4Kernel(QuantLinear):
    """Holds a lazily built (K/g, N64, 2) bf16 (scale, zero) table for `_weight_int4pack_mm_for_cpu`."""

    group_size = 32
    fast_path = "int4"
    packed_names: tuple[str, ...] = ()  # buffers in the 4-bit kernel's layout

    def _table(self, key: tuple, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        pad = _rows64(self.out_features) - self.out_features
        sz = torch.stack([F.pad(scale.float(), (0, 0, 0, pad)), F.pad(zero.float(), (0, 0, 0, pad))], dim=-1)
        table = sz.transpose(0, 1).to(torch.bfloat16).contiguous()  # (K/g, N64, 2)
        return table

    def _mm(self, x: torch.Tensor, packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, table)
        return y[:, :self.out_features] if y.shape[1] != self.out_features else y


class Int4Linear(_Int4Kernel):
    """Group-wise asymmetric 4-bit weights: value = q * scale + min per group of `group_size` inputs.

    Buffers: `qweight` uint8 (N64, K/2) in the kernel's layout (see the module docstring), `scales` and
    `mins` fp16 (N, K/group_size). With group 32 this is GGUF's Q4_1 block, and Q4_0 with min = -8 scale.
    """

    method = "int4"
    packed_names = ("qweight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32,
                 bias_dtype=torch.float32):
        super().__init__(in_features, out_features, bias, bias_dtype)
        check_group(in_features, group_size)
        self.group_size = group_size
        groups = in_features // group_size
        # empty, not zeros: set_quantized or a state dict fills them (zeroing SmolLM2's took a second per load)
        self.register_buffer("qweight", torch.empty(_rows64(out_features), in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        """Quantize an `nn.Linear`: per group, scale = (max - min) / 15 and q = round((w - min) / scale)."""
        check_group(linear.in_features, group_size)
        b = linear.bias
        layer = cls(linear.in_features, linear.out_features, b is not None, group_size,
                    b.dtype if b is not None else torch.float32).to(linear.weight.device)
        w = linear.weight.detach().float().view(linear.out_features, -1, group_size)  # (N, G, g)
        lo, hi = w.amin(dim=2), w.amax(dim=2)
        scale = ((hi - lo) / 15).half()
        mn = lo.half()
        s = torch.where(scale > 0, scale.float(), torch.ones_like(lo))  # q is 0 for a constant group
        q = torch.round((w - mn.float()[..., None]) / s[..., None]).clamp(0, 15)
        layer.set_quantized(q.view(linear.out_features, -1), scale, mn)
        if b is not None:
            layer.bias.data.copy_(b.detach())
        return layer

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        """Fill the layer from 4-bit values q (N, K) in 0..15 and fp16 scales/mins (N, K/group_size)."""
        self.qweight = pack_int4(q).to(self.qweight.device)  # a fresh buffer: no copy
        self.scales.copy_(scales)
        self.mins.copy_(mins)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K, g = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight, N, K).float().view(N, -1, g)
        # q * scale + min in fp32, as ggml computes a Q4_1 value (so GGUF blocks decode bit for bit)
        w = q * self.scales.float()[..., None] + self.mins.float()[..., None]
        return w.view(N, K).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of the float weight, (*rows.shape, in_features), unpacking only those rows."""
        K, g = self.in_features, self.group_size
        q = unpack_int4_rows(self.qweight, rows, K).float().view(*rows.shape, -1, g)
        w = q * self.scales[rows].float()[..., None] + self.mins[rows].float()[..., None]
        return w.view(*rows.shape, K).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cached = getattr(self, "_sz", None)
        if torch.compiler.is_compiling() and cached is not None:  # built by an eager call before
            return self._mm(x, self.qweight, cached[1])
        key = (self.scales.data_ptr(), self.scales._version, self.mins._version)
        if cached is None or cached[0] != key:
            s = self.scales.float()
            self._sz = cached = (key, self._table(key, s, self.mins.float() + 8 * s))
        return self._mm(x, self.qweight, cached[1])

    def quant_info(self) -> dict:
        return {"method": self.method, "group_size": self.group_size}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Q8Linear(_Int4Kernel):
    """GGUF Q8_0: blocks of 32 int8 values along the input with one fp16 scale d; value = q * d.

    Stored as the int8's high and low 4-bit halves (`qhi`, `qlo`, each (N64, K/2) in the 4-bit kernel's
    layout, together exactly the int8's bytes) and `scales` fp16 (N, K/32).
    """

    method = "q8_0"
    packed_names = ("qhi", "qlo")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_dtype=torch.float32):
        super().__init__(in_features, out_features, bias, bias_dtype)
        check_group(in_features, 32, "q8_0 block")
        n64 = _rows64(out_features)
        self.register_buffer("qhi", torch.empty(n64, in_features // 2, dtype=torch.uint8))  # filled as Int4Linear's
        self.register_buffer("qlo", torch.empty(n64, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, in_features // 32, dtype=torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Q8Linear:
        """Quantize an `nn.Linear` as GGUF's Q8_0 does: d = absmax / 127 per block, q = round(w / d)."""
        b = linear.bias
        layer = cls(linear.in_features, linear.out_features, b is not None,
                    b.dtype if b is not None else torch.float32).to(linear.weight.device)
        w = linear.weight.detach().float().view(linear.out_features, -1, 32)
        d = w.abs().amax(dim=2) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round(w * inv[..., None]).clamp(-127, 127).to(torch.int8)
        layer.set_quantized(q.view(linear.out_features, -1), d.half())
        if b is not None:
            layer.bias.data.copy_(b.detach())
        return layer

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Fill the layer from int8 values q (N, K) and fp16 block scales (N, K/32)."""
        q = (q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else q).astype(np.int8, copy=False)
        self.qhi = pack_int4((q >> 4) + 8).to(self.qhi.device)  # arithmetic shift: -8..7, stored as 0..15
        self.qlo = pack_int4(q & 0x0F).to(self.qlo.device)
        self.scales.copy_(scales)

    def int8_values(self) -> torch.Tensor:
        """The stored int8 values (N, K)."""
        N, K = self.out_features, self.in_features
        hi = unpack_int4(self.qhi, N, K).to(torch.int16) - 8
        return (hi * 16 + unpack_int4(self.qlo, N, K).to(torch.int16)).to(torch.int8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        w = self.int8_values().float().view(N, -1, 32) * self.scales.float()[..., None]
        return w.view(N, K).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows of the float weight, (*rows.shape, in_features), unpacking only those rows."""
        K = self.in_features
        hi = unpack_int4_rows(self.qhi, rows, K).to(torch.int16) - 8
        q = (hi * 16 + unpack_int4_rows(self.qlo, rows, K).to(torch.int16)).float()
        w = q.view(*rows.shape, -1, 32) * self.scales[rows].float()[..., None]
        return w.view(*rows.shape, K).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cached = getattr(self, "_tables", None)
        if torch.compiler.is_compiling() and cached is not None:  # built by an eager call before
            return self._mm(x, self.qhi, cached[1]) + self._mm(x, self.qlo, cached[2])
        key = (self.scales.data_ptr(), self.scales._version)
        if cached is None or cached[0] != key:
            d = self.scales.float()
            zero = torch.zeros_like(d)
            hi = self._table(key, 16 * d, zero)
            cached = self._tables = (key, hi, self._table(key, d, 8 * d))
        return self._mm(x, self.qhi, cached[1]) + self._mm(x, self.qlo, cached[2])


def check_group(width: int, group_size: int, what: str = "int4") -> None:
    """ConfigError unless `group_size` is one of GROUP_SIZES and divides `width`."""
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"{what} group size must be one of {GROUP_SIZES}, got {group_size}")
    if width % group_size:
        ok = [g for g in GROUP_SIZES if width % g == 0]
        raise ConfigError(f"{what} group size {group_size} does not divide the layer's input width {width}; "
                          f"use one that does ({', '.join(map(str, ok)) or 'none: keep this layer in float'})")


class QuantEmbedding(nn.Module):
    """A token embedding read from a quantized (N=vocab, K=d_model) layer: the tied LM head's table.

    `table` is the very module the LM head uses (one copy of the weights). `weight` is an empty tensor of
    the embedding's float dtype and device, for code that asks an embedding for them; `.to(dtype)` moves it.
    """

    def __init__(self, table: QuantLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=table.scales.device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.dequantize_rows(ids, self.weight.dtype)
