"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 4-9).

With a feature map phi(x) = elu(x) + 1 in place of the softmax kernel,

    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t),   S_t = sum_{s<=t} phi(k_s) v_s^T,   z_t = sum_{s<=t} phi(k_s)

per head. Training uses the chunkwise form: within a chunk of L steps, the masked L x L product
(phi(Q) phi(K)^T * causal) V; across chunks, the running (S, z) (T / L Python steps, O(T) time and memory).
Decode is the recurrence with state (S, z): (B, H, d, d) + (B, H, d), the same at every position.
Positions: none (causality alone orders the tokens, as in the paper); RoPE tables, if any, are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.models.mixers.base import MixerContext, RecurrentState

_CHUNK = 64
_EPS = 1e-6


class LinearAttentionState(RecurrentState):
    """S (B, H, d, d) and z (B, H, d), fp32."""

    def __init__(self, batch_size: int, n_head: int, head_dim: int, device):
        self.S = torch.zeros(batch_size, n_head, head_dim, head_dim, device=device)
        self.z = torch.zeros(batch_size, n_head, head_dim, device=device)



def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


def linear_attention(q, k, v, S=None, z=None, chunk: int = _CHUNK):
    """Chunkwise causal linear attention of already feature-mapped q, k (B, H, T, d) and v (B, H, T, d).

    Returns y (B, H, T, d) and the final (S, z)."""
    B, H, T, d = q.shape
    S = S if S is not None else q.new_zeros(B, H, d, v.shape[-1])
    z = z if z is not None else q.new_zeros(B, H, d)
    ys = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        qc, kc, vc = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        a = (qc @ kc.transpose(-1, -2)).tril()  # (B, H, L, L) intra-chunk, causal
        num = a @ vc + qc @ S  # (B, H, L, d)
        den = a.sum(-1) + (qc * z[:, :, None]).sum(-1)  # (B, H, L)
        ys.append(num / (den[..., None] + _EPS))
        S = S + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(2)
    return torch.cat(ys, 2), S, z


class LinearAttention(nn.Module):
    """Multi-head causal linear attention; same projections as `Attention` (fused qkv, proj)."""

    attr = "attn"
    resid_projs = ("proj",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """One key/value head per query head."""
        if cfg.n_kv_head != cfg.n_head:
            return ["linear_attention has no grouped KV heads: set attention.n_kv_head = attention.n_head"]
        return []

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * self.n_head * self.head_dim, bias=cfg.attention.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.attention.out_bias)

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> LinearAttentionState:
        return LinearAttentionState(batch_size, self.n_head, self.head_dim, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: LinearAttentionState | None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hs = self.n_head, self.head_dim
        q, k, v = self.qkv(x).float().view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        q, k = feature_map(q), feature_map(k)
        if ctx.pad is not None:  # padding adds nothing to (S, z)
            keep = ctx.pad[:, None, :, None].float()
            k, v = k * keep, v * keep
        if state is not None and T == 1:  # decode: one step of the recurrence
            state.S += k.transpose(-1, -2) @ v
            state.z += k[:, :, 0]
            y = (q @ state.S) / ((q * state.z[:, :, None]).sum(-1, keepdim=True) + _EPS)
        else:
            y, S, z = linear_attention(q, k, v, state.S if state else None, state.z if state else None)
            if state is not None:
                state.S, state.z = S, z
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs).to(x.dtype))
