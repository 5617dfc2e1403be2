"""Multi-scale retention (Sun et al. 2023, "Retentive Network", eq. 5-9), RetNet's token mixer.

Per head h with decay gamma_h = 1 - 2^(-5-h) (the paper's multi-scale choice), queries and keys rotated
by the model's RoPE tables when it has them (the paper's xPos-like Theta):

    parallel:   O = (Q K^T / sqrt(d) * D) V,  D[n, m] = gamma^(n-m) if n >= m else 0
    recurrent:  S_n = gamma S_{n-1} + k_n^T v_n / sqrt(d),   o_n = q_n S_n
    chunkwise:  within a chunk the parallel form, across chunks R_i = gamma^L R_{i-1} + K_i^T (V_i * zeta)
                (the paper's eq. 7), added to the chunk's queries scaled by gamma^(j+1)

then a per-head GroupNorm, the swish gate and the output projection: Y = (swish(X W_G) * GN(O)) W_O.
`retention(..., chunk=T)` is the parallel form, `chunk=1` the recurrence; training uses chunks of 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.models.layers import apply_rope
from lmforge.models.mixers.base import MixerContext, RecurrentState

_CHUNK = 64


class RetentionState(RecurrentState):
    """S (B, H, d, d), fp32: the whole past, at any position."""

    def __init__(self, batch_size: int, n_head: int, head_dim: int, device):
        self.S = torch.zeros(batch_size, n_head, head_dim, head_dim, device=device)



def decays(n_head: int) -> torch.Tensor:
    """gamma_h = 1 - 2^(-5-h), h = 0..n_head-1."""
    return 1 - 2.0 ** (-5.0 - torch.arange(n_head, dtype=torch.float32))


def retention(q, k, v, gamma, S=None, chunk: int = _CHUNK):
    """Causal retention of q, k, v (B, H, T, d) (k already scaled) with per-head decay gamma (H,).

    Returns O (B, H, T, d) and the final state S (B, H, d, d)."""
    B, H, T, d = q.shape
    S = S if S is not None else q.new_zeros(B, H, d, v.shape[-1])
    lg = gamma.log()[:, None]  # (H, 1)
    outs = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        L = e - s
        i = torch.arange(L, dtype=q.dtype, device=q.device)
        diff = i[:, None] - i[None, :]  # n - m
        D = torch.where(diff >= 0, (diff[None] * lg[..., None]).exp(), torch.zeros((), device=q.device))  # (H, L, L)
        qc, kc, vc = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        inner = ((qc @ kc.transpose(-1, -2)) * D) @ vc  # (B, H, L, d)
        cross = (qc * ((i + 1)[None] * lg).exp()[..., None]) @ S  # query j sees the past decayed by gamma^(j+1)
        outs.append(inner + cross)
        zeta = ((L - 1 - i)[None] * lg).exp()[..., None]  # (H, L, 1): key m decays gamma^(L-1-m) to the chunk's end
        S = (L * lg).exp()[..., None] * S + kc.transpose(-1, -2) @ (vc * zeta)
    return torch.cat(outs, 2), S


class Retention(nn.Module):
    """Multi-scale retention with the swish gate and per-head GroupNorm."""

    attr = "retention"
    resid_projs = ("proj",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """One key/value head per query head."""
        if cfg.n_kv_head != cfg.n_head:
            return ["retention has no grouped KV heads: set attention.n_kv_head = attention.n_head"]
        return []

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        inner = self.n_head * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.gate = nn.Linear(cfg.d_model, inner, bias=False)
        self.norm = nn.GroupNorm(self.n_head, inner, eps=cfg.norm.eps, affine=True)
        self.proj = nn.Linear(inner, cfg.d_model, bias=False)
        self.register_buffer("gamma", decays(self.n_head), persistent=False)

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> RetentionState:
        return RetentionState(batch_size, self.n_head, self.head_dim, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: RetentionState | None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hs = self.n_head, self.head_dim
        q, k, v = self.qkv(x).float().view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = apply_rope(q, cos.float(), sin.float()), apply_rope(k, cos.float(), sin.float())
        k = k * hs ** -0.5
        if ctx.pad is not None:  # padding adds nothing to the state
            keep = ctx.pad[:, None, :, None].float()
            k, v = k * keep, v * keep
        o, S = retention(q, k, v, self.gamma, state.S if state is not None else None)
        if state is not None:
            state.S = S
        o = self.norm(o.transpose(1, 2).reshape(B * T, nh * hs)).view(B, T, nh * hs)
        return self.proj((F.silu(self.gate(x).float()) * o).to(x.dtype))
