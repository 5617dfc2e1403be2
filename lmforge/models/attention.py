"""Causal self-attention (MHA / GQA / MQA, sliding window) and the preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.models.layers import apply_rope


class KVCache:
    """A static key/value cache: one preallocated buffer per layer, filled left to right.

    Every row of a batch shares the slot index (prompts are left-padded), so a decode step writes one
    slot for all rows; `key_mask` marks which slots hold real tokens and `next_pos` is each row's next
    position id (it differs between rows when their prompts differ in length).
    """

    def __init__(self, cfg: Config, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled
        self.max_len = max_len
        self.has_padding = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at the next slots; return views of everything filled so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def bytes(self) -> int:
        """Memory held by the key/value buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Unpadded:
    """Where the real tokens of a padded batch sit, so that an encoder computes nothing for padding.

    Position-wise work (projections, MLP, norms) runs on the packed real tokens (1, N, C); attention
    alone unpacks its Q/K/V to (B, T) rows and masks the padding keys. With sorted batches of mixed-length
    sentences ~20% of a batch is padding (all-MiniLM-L6-v2, batch 32, bench/encode.py).
    """

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = tuple(attention_mask.shape)  # (B, T)
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,) flat positions of real tokens
        self.attn_mask = attention_mask[:, None, None, :]  # (B, 1, 1, T), True = may attend

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (1, N, C): the real tokens only."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N, C) -> (B, T, C), zeros at padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.shape[-1])
        return out.index_copy_(0, self.index, x[0]).view(*self.shape, x.shape[-1])


class Attention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection.

    n_kv_head < n_head gives grouped-query attention (Ainslie et al. 2023); n_kv_head = 1 multi-query
    (Shazeer 2019). Attention itself is `F.scaled_dot_product_attention`.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                             bias=cfg.attention.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.attention.out_bias)
        self.dropout = cfg.attention.dropout
        self.causal = cfg.attention.causal  # False: bidirectional encoder, only padding is masked

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        hs, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        h = self.qkv(x)
        unpadded = mask if isinstance(mask, Unpadded) else None
        if unpadded is not None:  # encoder fast path: x holds the real tokens only (1, N, C)
            h, mask, (B, T) = unpadded.unpack(h), unpadded.attn_mask, unpadded.shape
        qk, v = h.split([(nh + nkv) * hs, nkv * hs], dim=-1)
        qk = qk.view(B, T, nh + nkv, hs).transpose(1, 2)  # (B, nh + nkv, T, hs): queries, then keys
        if rope is not None:
            qk = apply_rope(qk, *rope)  # one rotation for queries and keys together
        q, k = qk.split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, L, hs), L = slots filled incl. these T
            q = q.to(k.dtype)  # a cache may be kept in higher precision than the model (see new_cache)
        # mask None means "plain causal, queries and keys aligned" (or a single query seeing all keys)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=nkv != nh,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)
        return self.proj((unpadded.pack(y) if unpadded is not None else y).to(x.dtype))


def build_mask(key_valid: torch.Tensor | None, q_start: int, T: int, L: int, window: int | None,
               device: torch.device) -> torch.Tensor:
    """Boolean (B or 1, 1, T, L) mask, True = may attend, for queries at slots q_start..q_start+T-1.

    A query sees keys at slots <= its own, within `window` of it, and not padding. Every query also sees
    itself, so a padding query never has an all-masked row (that would give NaN, and NaN times a zero
    weight is still NaN when later layers read that slot).
    """
    q = torch.arange(q_start, q_start + T, device=device).unsqueeze(1)  # (T, 1)
    k = torch.arange(L, device=device).unsqueeze(0)  # (1, L)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed.unsqueeze(0)  # (1, T, L)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, :L]) | (k == q).unsqueeze(0)
    return allowed.unsqueeze(1)  # (B, 1, T, L)
