"""Building blocks shared by the decoder: norms, feed-forward blocks, rotary position embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import GATED, Config


def make_norm(cfg: Config) -> nn.Module:
    """LayerNorm (optionally without bias) or RMSNorm over `d_model`."""
    if cfg.norm.kind == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm.eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm.eps, bias=cfg.norm.bias)


_ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """Position-wise feed-forward: proj(act(fc(x))), or for gated kinds proj(act(gate) * up).

    A gated MLP keeps gate and up in one `fc` (2*hidden outputs, gate first): one matmul instead of
    two, which at batch-1 decode is one weight read instead of two kernel launches.
    A channel mixer (see `lmforge.models.mixers`); `ctx` and `state` are not needed.
    """

    attr = "mlp"
    resid_projs = ("proj",)

    def __init__(self, cfg: Config):
        super().__init__()
        h = cfg.mlp.hidden
        self.gated = cfg.mlp.activation in GATED
        self.activation = cfg.mlp.activation
        self.act = _ACT[cfg.mlp.activation]
        self.fc = nn.Linear(cfg.d_model, 2 * h if self.gated else h, bias=cfg.mlp.bias)
        self.proj = nn.Linear(h, cfg.d_model, bias=cfg.mlp.bias)

    def forward(self, x: torch.Tensor, ctx=None, state=None) -> torch.Tensor:
        fused = getattr(self.fc, "fused", None)  # a prepacked fc (`lmforge.infer.packed`) applies act itself
        if fused is not None and not self.gated and (h := fused(x, self.activation)) is not None:
            return self.proj(h)
        h = self.fc(x)  # (B, T, h) or (B, T, 2h)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.proj(self.act(gate) * up)
        return self.proj(self.act(h))


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for RoPE, with the configured scaling applied."""
    hd, theta = cfg.head_dim, cfg.position.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = cfg.position.rope_scaling
    if not sc:
        return inv_freq.float()
    kind = sc.get("type") or sc.get("rope_type")
    if kind == "linear":  # position interpolation (Chen et al. 2023): positions / factor
        return (inv_freq / sc["factor"]).float()
    if kind == "llama3":  # Llama 3.1: scale long wavelengths, keep short ones, blend in between
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        return scaled.float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")


class Rotary(nn.Module):
    """Precomputed cos/sin tables for RoPE (Su et al. 2021), in the rotate-half layout of HF Llama.

    The sin table is stored with its first half negated (see `apply_rope`)."""

    def __init__(self, cfg: Config):
        super().__init__()
        t = torch.arange(cfg.block_size, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(cfg))  # (T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
        sin = emb.sin()
        sin[:, : sin.shape[1] // 2].neg_()
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) -> cos, signed sin: (B, 1, T, hd), broadcast over heads
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return (cos, sin) if dtype == cos.dtype else (cos.to(dtype), sin.to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle. x: (B, nh, T, hs).

    cos, sin as `Rotary` gives them: sin negated in its first half, so that HF's x * cos + cat(-x2, x1) * sin
    is x * cos + roll(x) * sin here (the same products, as negation is exact), in 4 ops instead of 8 (a decode
    step runs this once per layer)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def sinusoid_table(n_positions: int, d: int) -> torch.Tensor:
    """(n_positions, d) fixed positions of Vaswani et al. 2017, section 3.5:
    PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    table = torch.zeros(n_positions, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : d // 2]
    return table.float()


class RelativePositionBias(nn.Embedding):
    """T5's learned relative attention bias (Raffel et al. 2020, section 2.1): one scalar per head and
    distance bucket, added to the attention scores. The first layer of a stack computes it and every layer
    reuses it (here the stack computes it once per forward).

    Distances below buckets/2 (per direction when bidirectional) get a bucket each; longer ones share
    logarithmically wider buckets up to `max_distance`, beyond which all fall in the last. A causal
    decoder only looks back, so it spends all buckets on one direction.
    """

    def __init__(self, cfg: Config):
        super().__init__(cfg.position.buckets, cfg.n_head)
        self.bidirectional = not cfg.attention.causal
        self.max_distance = cfg.position.max_distance

    def buckets(self, rel: torch.Tensor) -> torch.Tensor:
        """Bucket ids for relative positions rel = key - query (any shape)."""
        n, out = self.num_embeddings, torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            out = out + (rel > 0).long() * n
            rel = rel.abs()
        else:
            rel = (-rel).clamp(min=0)  # only keys at or before the query
        exact = n // 2
        log_ratio = torch.log(rel.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
        far = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)
        return out + torch.where(rel < exact, rel, far)

    def table(self, q_start: int, T: int, L: int) -> torch.Tensor:
        """(1, n_head, T, L) bias for queries at slots q_start..q_start+T-1 and keys at slots 0..L-1."""
        q = torch.arange(q_start, q_start + T, device=self.weight.device)
        k = torch.arange(L, device=self.weight.device)
        b = self(self.buckets(k[None, :] - q[:, None]))  # (T, L, nh)
        return b.permute(2, 0, 1).unsqueeze(0)
