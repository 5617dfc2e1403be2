"""Ternary (1.58-bit) linears: BitNet b1.58 (Ma et al. 2024) quantization-aware training and packed inference.

Training (`BitLinear`, an `nn.Linear` subclass with the same `weight`/`bias`, so state dicts, optimizers and
LoRA wrappers see an ordinary linear): the forward pass uses
    weights      W_t = clamp(round(W / gamma), -1, 1) * gamma,   gamma = mean(|W|)      (absmean, per tensor)
    activations  x_q = clamp(round(x * s), -128, 127) / s,       s = 127 / max|x| per token (8-bit absmax)
with straight-through estimators (the rounding's gradient is taken as 1), so the float "latent" weights
learn while the loss sees ternary ones. Switch it on with `Config.bitlinear = True` (pre-training: the
model is built with BitLinears) or `ternarize(model)` (fine-tuning a float model); both compose with LoRA.

Inference (`TernaryLinear`): the ternary values packed four per byte (2 bits each, code t + 1 in 0..2,
the first value in the lowest bits) with gamma in fp32. `forward` quantizes the activations to int8 as in
training, unpacks the codes and multiplies integer by integer in fp32 (exact: the sums stay far below
2^24), then scales by gamma / s: the same numbers as the unpacked reference `ternary_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-5


def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, gamma): ternary values t in {-1, 0, 1} (same dtype as w) and the per-tensor scale gamma."""
    gamma = w.abs().mean().clamp(min=_EPS)
    return (w / gamma).round().clamp(-1, 1), gamma


def absmax_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q, s): integer-valued activations in -128..127 and the per-token scale s = 127 / max|x|."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS)
    return (x * s).round().clamp(-128, 127), s


class BitLinear(nn.Linear):
    """`nn.Linear` trained with ternary weights and 8-bit activations (straight-through estimators)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, gamma = absmean_ternary(self.weight)
        w = self.weight + (t * gamma - self.weight).detach()  # STE: forward ternary, backward identity
        xq, s = absmax_int8(x)
        x = x + (xq / s - x).detach()
        return F.linear(x, w, self.bias)


def ternarize(model: nn.Module, lm_head: bool = False) -> nn.Module:
    """Swap every `nn.Linear` of `model` (not the LM head unless `lm_head`, as in BitNet) for a `BitLinear`
    sharing its parameters, in place; sets `model.config.bitlinear` so saved models rebuild the same way."""
    for pname, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{pname}.{name}" if pname else name
            if type(child) is nn.Linear and (lm_head or full != "lm_head"):
                new = BitLinear.__new__(BitLinear)
                new.__dict__ = child.__dict__  # same Parameters, hooks and attributes: a class change only
                setattr(parent, name, new)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "bitlinear"):
        cfg.bitlinear = True
    return model


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """(N, K) values in {-1, 0, 1} -> (N, ceil(K/4)) uint8, four 2-bit codes t + 1 per byte, low bits first."""
    N, K = t.shape
    c = F.pad((t + 1).to(torch.uint8), (0, (-K) % 4)).view(N, -1, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `pack_ternary`: (N, K) values in {-1, 0, 1} of `dtype`."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    c = (packed.unsqueeze(-1) >> shifts) & 3  # (N, K/4, 4)
    return c.view(packed.shape[0], -1)[:, :K].to(dtype) - 1


def ternary_reference(x: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """What a BitLinear computes, from unpacked ternary values: (x_q @ t.T) * gamma / s (+ bias)."""
    xq, s = absmax_int8(x.float())
    y = F.linear(xq, t.float()) * (gamma / s)
    return (y + bias.float() if bias is not None else y).to(x.dtype)


class TernaryLinear(nn.Module):
    """Inference layer holding 2-bit packed ternary weights (`packed` (N, ceil(K/4)) uint8, `gamma` ())."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.zeros(out_features, -(-in_features // 4), dtype=torch.uint8))
        self.register_buffer("gamma", torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TernaryLinear:
        """Pack a (QAT-trained) linear's absmean-ternary weight."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        t, gamma = absmean_ternary(linear.weight.detach().float())
        layer.packed.copy_(pack_ternary(t))
        layer.gamma.copy_(gamma)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight t * gamma (out_features, in_features)."""
        return (unpack_ternary(self.packed, self.in_features) * self.gamma).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, s = absmax_int8(x.float())
        y = F.linear(xq, unpack_ternary(self.packed, self.in_features)) * (self.gamma / s)
        return (y + self.bias if self.bias is not None else y).to(x.dtype)


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every `BitLinear` by a packed `TernaryLinear`, in place, for inference."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                setattr(parent, name, TernaryLinear.from_linear(child))
    return model
