"""NF4 (4-bit NormalFloat) linear layer: the frozen base of QLoRA (Dettmers et al. 2023).

API:
    layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=False)
    layer.in_features, layer.out_features     # as nn.Linear
    layer.dequantize(dtype=torch.float32)     # (out_features, in_features) float weight
    layer(x)                                  # x @ W.T + b; differentiable w.r.t. x, the base stays frozen
    layer.bias                                # frozen nn.Parameter or None

Storage (all persistent buffers, so `state_dict` / safetensors round-trip them):
    codes   uint8 (ceil(out*in / 2),)    two 4-bit indices into NF4_CODE per byte, the weight flattened
                                           row-major; the even element in the low nibble
    absmax  float32 (n_blocks,)           per-block absolute maximum; or, with double quantisation:
    absmax_q int8 (n_blocks,), absmax_scale float32 (ceil(n_blocks / 256),), absmax_mean float32 ()
                                           the block scales minus their mean, int8 absmax-quantised in
                                           groups of 256 (QLoRA section 3: 0.5 -> 0.127 bits per weight)

A weight value is NF4_CODE[code] * absmax[block]. NF4_CODE holds the 16 quantiles of N(0, 1), scaled to
[-1, 1] with an exact zero (QLoRA appendix E). Quantisation picks the nearest code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
_DQ_GROUP = 256  # block scales per second-level group (QLoRA / bitsandbytes)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: for each byte b, the fp32 pair (code[b & 15], code[b >> 4]) viewed as one int64.

    Dequantizing is then one `index_select` of a byte's two weights at once (int32 indices): on 2 cores
    for a 1536 x 576 weight 0.5 ms, against 11 ms for unpacking the nibbles to int64 and gathering each.
    """
    b = torch.arange(256)
    return torch.stack([code[b & 0x0F], code[b >> 4]], dim=1).float().contiguous().view(torch.int64).view(-1)


def _pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 values 0..15 -> (ceil(n/2),) uint8, element 2i in the low nibble of byte i."""
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    idx = idx.view(-1, 2)
    return (idx[:, 0] | (idx[:, 1] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_pack_nibbles`: (n,) int64 indices."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:n]
    return out.long()


class NF4Linear(nn.Module):
    """A linear layer whose weight is stored in NF4 (4-bit NormalFloat, block-wise absmax scales).

    Build it with `NF4Linear.from_linear(linear)`; see the module docstring for the storage layout.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if blocksize <= 0 or blocksize % 2:
            raise ConfigError(f"NF4 block size must be a positive even number, got {blocksize}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("codes", torch.zeros(-(-n // 2), dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(n_blocks, dtype=torch.int8))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // _DQ_GROUP)))
            self.register_buffer("absmax_mean", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks))
        self.register_buffer("code", NF4_CODE.clone(), persistent=False)
        self.register_buffer("pairs", _pair_table(NF4_CODE), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> NF4Linear:
        """Quantize an `nn.Linear` (any float dtype) to NF4. The bias is kept in its own dtype, frozen."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                    dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        layer.to(w.device)
        layer.quantize_(w)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Quantize a float weight (out_features, in_features) into this layer's buffers, in place."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"weight shape {tuple(weight.shape)} does not match "
                              f"({self.out_features}, {self.in_features})")
        flat = weight.float().reshape(-1)
        n, bs = flat.numel(), self.blocksize
        pad = (-n) % bs
        blocks = F.pad(flat, (0, pad)).view(-1, bs)  # (n_blocks, bs)
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
        # nearest code: codes are sorted, so compare against the midpoints between neighbours
        mids = (self.code[1:] + self.code[:-1]) / 2
        idx = torch.bucketize(scaled, mids.to(scaled.device)).to(torch.uint8).view(-1)[:n]
        self.codes.copy_(_pack_nibbles(idx))
        if self.double_quant:
            mean = absmax.mean()
            centred = absmax - mean
            g = F.pad(centred, (0, (-centred.numel()) % _DQ_GROUP)).view(-1, _DQ_GROUP)
            scale = g.abs().amax(dim=1) / 127
            q = torch.round(g / scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).clamp(-127, 127)
            self.absmax_q.copy_(q.view(-1)[:absmax.numel()].to(torch.int8))
            self.absmax_scale.copy_(scale)
            self.absmax_mean.copy_(mean)
        else:
            self.absmax.copy_(absmax)

    def block_absmax(self) -> torch.Tensor:
        """The per-block scales (n_blocks,) float32, decoded from their int8 form under double quantisation."""
        if not self.double_quant:
            return self.absmax
        s = self.absmax_scale.repeat_interleave(_DQ_GROUP)[:self.absmax_q.numel()]
        return self.absmax_q.float() * s + self.absmax_mean

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out_features, in_features) that this layer multiplies by (computed in fp32)."""
        n, bs = self.in_features * self.out_features, self.blocksize
        absmax = self.block_absmax()
        vals = torch.index_select(self.pairs, 0, self.codes.int()).view(torch.float32)  # (2 * n_bytes,)
        if vals.numel() != absmax.numel() * bs:  # a last block cut short: pad it (rare)
            vals = F.pad(vals[:n], (0, (-n) % bs))
        vals = vals.view(-1, bs).mul_(absmax.float().unsqueeze(1))
        w = vals.view(-1)[:n].view(self.out_features, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight is rebuilt per call (a buffer, no grad); autograd flows through F.linear to x
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")
