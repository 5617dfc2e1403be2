"""Transformer-XL attention: segment recurrence with relative positions (Dai et al. 2019, section 3.2-3.3).

A layer keeps a memory m of the last `xl.mem_len` hidden states it was given (its input, stop-gradient)
and attends over [m; x] with queries from x alone. Scores use relative positions only (eq. in section 3.3):

    A_ij = (q_i + u) . k_j  +  (q_i + v) . W_R R_{i-j},     scaled by 1/sqrt(d_head)

with R the sinusoidal embedding of the distance i - j (Vaswani et al.'s table, d_model wide), W_R a
per-layer projection and u, v per-layer learned biases (content and position). Keys and values come from
[m; x] through the usual projections; a query sees every memory slot and the segment up to itself.

The memory is the layer's decode state (`XLMemory`), so one mechanism serves both uses:
- training with segment recurrence: the `segment_lm` objective keeps a `Cache` across consecutive segments
  of the same streams (`lmforge.train.segments`); `Cache.new_segment()` detaches it (stop-gradient);
- generation: the one generator's cache; each step attends over the memory + itself. Decode memory is
  constant (mem_len hidden states per layer), so a query sees at most mem_len earlier tokens: decoding
  equals the full pass exactly while the text fits in memory, and beyond that it equals the full pass
  under a window of mem_len + 1 keys (both tested).

Without a state (a plain forward) a segment attends causally within itself: the first segment of a stream.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import Config
from lmforge.models.mixers.base import MixerContext, RecurrentState


class XLMemory(RecurrentState):
    """mem (B, M, C): the last M <= mem_len layer inputs; valid (B, M) bool: False at padding."""

    def __init__(self, batch_size: int, d_model: int, dtype: torch.dtype, device):
        self.mem = torch.zeros(batch_size, 0, d_model, dtype=dtype, device=device)
        self.valid = torch.ones(batch_size, 0, dtype=torch.bool, device=device)

    def detach_(self) -> None:
        """Stop gradients at the segment boundary (the paper's SG(.))."""
        self.mem = self.mem.detach()


def sinusoid(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embeddings (K, dim) of distances (K,): [sin(d w_i), cos(d w_i)], w_i = 10000^(-2i/dim)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    angles = distances.float()[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class XLAttention(nn.Module):
    """Multi-head Transformer-XL attention (`xl_attention` token mixer); `xl.mem_len` sets the memory."""

    attr = "attn"
    resid_projs = ("proj",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """Problems with `xl.mem_len` and the attention settings Transformer-XL attention cannot honour."""
        out = []
        if not (isinstance(cfg.xl.mem_len, int) and cfg.xl.mem_len >= 0):
            out.append(f"xl.mem_len must be a non-negative integer, got {cfg.xl.mem_len!r}")
        if cfg.n_kv_head != cfg.n_head:
            out.append("xl_attention has no grouped KV heads: set attention.n_kv_head = attention.n_head")
        if not cfg.attention.causal:
            out.append("xl_attention is causal: set attention.causal = true")
        return out

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.head_dim, self.d_model = cfg.n_head, cfg.head_dim, cfg.d_model
        self.mem_len = cfg.xl.mem_len
        inner = self.n_head * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=cfg.attention.qkv_bias)
        self.r_proj = nn.Linear(cfg.d_model, inner, bias=False)  # W_R
        self.u = nn.Parameter(torch.zeros(self.n_head, self.head_dim))  # content bias
        self.v = nn.Parameter(torch.zeros(self.n_head, self.head_dim))  # position bias
        self.proj = nn.Linear(inner, cfg.d_model, bias=cfg.attention.out_bias)
        self.dropout = nn.Dropout(cfg.attention.dropout)

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> XLMemory:
        """An empty memory (it fills up to mem_len hidden states)."""
        return XLMemory(batch_size, self.d_model, dtype, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: XLMemory | None) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, self.head_dim
        mem = state.mem.to(x.dtype) if state is not None else x.new_zeros(B, 0, C)
        M = mem.shape[1]
        K = M + T
        h = torch.cat([mem, x], dim=1)  # (B, K, C)
        q, k, v = self.qkv(h).view(B, K, 3, nh, hs).permute(2, 0, 3, 1, 4)  # each (B, nh, K, hs)
        q = q[:, :, M:]  # (B, nh, T, hs): queries of this segment only
        r = self.r_proj(sinusoid(torch.arange(K, device=x.device), C).to(x.dtype)).view(K, nh, hs)  # by distance
        content = (q + self.u[:, None]) @ k.transpose(-1, -2)  # (B, nh, T, K)
        by_dist = (q + self.v[:, None]) @ r.permute(1, 2, 0)  # (B, nh, T, K): column = distance 0..K-1
        i = torch.arange(T, device=x.device)[:, None] + M  # query slots in [m; x]
        j = torch.arange(K, device=x.device)[None]
        dist = i - j  # (T, K)
        position = by_dist.gather(-1, dist.clamp(min=0).expand(B, nh, T, K))
        scores = (content + position) / math.sqrt(hs)
        allowed = (dist >= 0).expand(B, 1, T, K)
        if ctx.mask is not None and not isinstance(ctx.mask, torch.Tensor):
            raise ValueError("xl_attention is a causal decoder mixer; it cannot run unpadded encoder batches")
        if ctx.mask is not None:  # a caller's own visibility pattern (B or 1, 1, T, K)
            allowed = allowed & ctx.mask[..., -K:]
        valid = None
        if state is not None or ctx.pad is not None:
            now = ctx.pad if ctx.pad is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            valid = torch.cat([state.valid, now], 1) if state is not None else now  # (B, K)
            allowed = allowed & valid[:, None, None, :]
        allowed = allowed | (dist == 0)  # a padding query sees itself: no all-masked row, no NaN
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = self.dropout(scores.softmax(-1)) @ v  # (B, nh, T, hs)
        if state is not None:
            keep = min(self.mem_len, K)
            state.mem = h[:, K - keep:].detach().to(state.mem.dtype)
            state.valid = valid[:, K - keep:]
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))
