"""Causal or bidirectional self-attention (MHA / GQA / MQA, sliding window) and its decode state, the KV buffers.

softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017), computed by `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.models.layers import apply_rope
from lmforge.models.mixers.base import MixerContext


class KVState:
    """One layer's preallocated key/value buffers (B, nkv, max_len, hs), filled left to right.

    Every row of a batch shares the slot index (prompts are left-padded), so a decode step writes one
    slot for all rows; which slots hold real tokens is the model cache's `key_mask`.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # an encoder-decoder's cross-attention keys/values (B, nkv, S, hs) and encoder mask (B, 1, 1, S) or
        # None: computed once per input at the first decoder call (`CrossAttention`), then only read
        self.cross: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at slots start..start+T-1; return views of slots 0..start+T-1."""
        end = start + k.shape[2]
        self.k.narrow(2, start, k.shape[2]).copy_(k)  # narrow: fewer dispatches than slicing, once per layer
        self.v.narrow(2, start, k.shape[2]).copy_(v)
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Row i takes over row `rows[i]`'s first `length` slots (beam search)."""
        self.k[:, :, :length] = self.k[rows, :, :length]
        self.v[:, :, :length] = self.v[rows, :, :length]
        if self.cross is not None:
            self.cross = tuple(None if t is None else t[rows] for t in self.cross)

    def repeat_rows(self, n: int) -> KVState:
        """A copy in which each row appears `n` times in a row."""
        new = object.__new__(KVState)
        new.k, new.v = self.k.repeat_interleave(n, 0), self.v.repeat_interleave(n, 0)
        new.cross = None if self.cross is None else tuple(
            None if t is None else t.repeat_interleave(n, 0) for t in self.cross)
        return new

    def bytes(self) -> int:
        """Memory held by the key/value buffers (cross-attention's included)."""
        held = [self.k, self.v, *(t for t in self.cross or () if t is not None)]
        return sum(t.numel() * t.element_size() for t in held)


class Unpadded:
    """Where the real tokens of a padded batch sit, so that an encoder computes nothing for padding.

    Passed as `ctx.mask`. Position-wise work (projections, MLP, norms) runs on the packed real tokens
    (1, N + 1, C); attention alone spreads its Q/K/V to (B, T) rows and masks the padding keys. With sorted
    batches of mixed-length sentences ~20% of a batch is padding (all-MiniLM-L6-v2, batch 32, bench/encode.py).

    The packed rows end with one spare row (a copy of the first real token's, so always finite) that every
    padding position reads when attention spreads the rows out: one gather instead of zero-filling and
    scattering (bf16 MiniLM batch 32: 0.44 ms against 1.1 ms per layer). Padding keys are masked and
    padding queries' outputs are dropped, so the spare row changes no real token, and gets no gradient.
    """

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = tuple(attention_mask.shape)  # (B, T)
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,) flat positions of real tokens
        n = self.index.numel()
        self._pick = torch.cat([self.index, self.index[:1]])  # (N + 1,): the real tokens, then the spare row
        self._spread = torch.full((attention_mask.numel(),), n, dtype=torch.long, device=attention_mask.device)
        self._spread[self.index] = torch.arange(n, device=attention_mask.device)  # padding reads row N
        self.attn_mask = attention_mask[:, None, None, :]  # (B, 1, 1, T), True = may attend

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (1, N + 1, C): the real tokens, then the spare row."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self._pick).unsqueeze(0)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N + 1, C) -> (B, T, C), the spare row at padding (for attention, which masks it)."""
        return x[0].index_select(0, self._spread).view(*self.shape, x.shape[-1])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N + 1, C) -> (B, T, C), zeros at padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.shape[-1])
        return out.index_copy_(0, self.index, x[0, :self.index.numel()]).view(*self.shape, x.shape[-1])


class Attention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection.

    n_kv_head < n_head gives grouped-query attention (Ainslie et al. 2023); n_kv_head = 1 multi-query
    (Shazeer 2019). Attention itself is `F.scaled_dot_product_attention`.
    """

    attr = "attn"  # the block's attribute (state-dict prefix `blocks.i.attn.`)
    resid_projs = ("proj",)  # writes into the residual stream: scaled at GPT-2 init
    # lmforge.inspect sets an instance's own `probe` for the length of one traced call, then deletes it: a
    # callable (module, q, k, mask, causal, y) -> y that records the probabilities and may zero heads' outputs
    probe = None

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                             bias=cfg.attention.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.attention.out_bias)
        self.dropout = cfg.attention.dropout
        self.causal = cfg.attention.causal  # False: bidirectional encoder, only padding is masked
        self.scale = cfg.attention.scale

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> KVState:
        """Empty key/value buffers for `max_len` slots."""
        return KVState(batch_size, self.n_kv_head, max_len, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: KVState | None) -> torch.Tensor:
        B, T, _ = x.shape
        hs, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        h, mask = self.qkv(x), ctx.mask
        unpadded = mask if isinstance(mask, Unpadded) else None
        if unpadded is not None:  # encoder fast path: x holds the real tokens only (1, N, C)
            h, mask, (B, T) = unpadded.spread(h), unpadded.attn_mask, unpadded.shape
        qk, v = h.split([(nh + nkv) * hs, nkv * hs], dim=-1)
        qk = qk.view(B, T, nh + nkv, hs).transpose(1, 2)  # (B, nh + nkv, T, hs): queries, then keys
        if ctx.rope is not None:
            qk = apply_rope(qk, *ctx.rope)  # one rotation for queries and keys together
        q, k = qk.split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if state is not None and hasattr(state, "attend"):
            # a packed batch of several sequences (the serving engine's paged cache): the state stores the
            # keys and values and attends within each sequence
            y = state.attend(q, k, v, self.scale)
        else:
            if state is not None:
                k, v = state.update(k, v, ctx.start)  # (B, nkv, L, hs), L = slots filled incl. these T
                if q.dtype != k.dtype:  # a cache may be kept in higher precision than the model (see new_cache)
                    q = q.to(k.dtype)
            if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)  # an additive bias (T5) under autocast or a higher-precision cache
            # mask None means "plain causal, queries and keys aligned" (or a single query seeing all keys)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=nkv != nh, scale=self.scale,
            )  # (B, nh, T, hs)
            if self.probe is not None:  # only inside lmforge.inspect.trace: one attribute test per layer otherwise
                y = self.probe(self, q, k, mask, self.causal and mask is None and T > 1, y)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)
        if unpadded is not None:
            y = unpadded.pack(y)
        return self.proj(y if y.dtype == x.dtype else y.to(x.dtype))


class CrossAttention(nn.Module):
    """Decoder queries over an encoder's output (Vaswani et al. 2017, section 3.2.3: "encoder-decoder attention").

    Keys and values come from the encoder output (`ctx.memory`), once per input: a decode step reads them
    from the layer's cache state (`KVState.cross`) instead of projecting the encoder output again. The
    encoder's padding is masked; there is no causal mask and no position bias (T5 has none here either).
    """

    attr = "cross_attn"
    resid_projs = ("proj",)
    probe = None  # as `Attention.probe`

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, self.n_head * self.head_dim, bias=cfg.attention.qkv_bias)
        self.kv = nn.Linear(cfg.d_model, 2 * self.n_kv_head * self.head_dim, bias=cfg.attention.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.attention.out_bias)
        self.dropout, self.scale = cfg.attention.dropout, cfg.attention.scale

    def memory_kv(self, memory: torch.Tensor, memory_mask: torch.Tensor | None):
        """(k, v, mask): keys/values (B, nkv, S, hs) of an encoder output (B, S, C), mask (B, 1, 1, S) or None."""
        B, S, _ = memory.shape
        kv = self.kv(memory).view(B, S, 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        k, v = kv.split([self.n_kv_head, self.n_kv_head], dim=1)
        mask = None if memory_mask is None or bool(memory_mask.all()) else memory_mask.bool()[:, None, None, :]
        return k, v, mask

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: KVState | None) -> torch.Tensor:
        B, T, _ = x.shape
        if state is not None and state.cross is not None:
            k, v, mask = state.cross
        else:
            if ctx.memory is None:
                raise ConfigError("cross-attention needs the encoder's output: call the encoder-decoder with "
                                  "input_ids (or memory=) on the first decoder step")
            k, v, mask = self.memory_kv(ctx.memory, ctx.memory_mask)
            if state is not None:
                state.cross = (k, v, mask)
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2).to(k.dtype)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head, scale=self.scale)
        if self.probe is not None:
            y = self.probe(self, q, k, mask, False, y)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                    scale: float | None) -> torch.Tensor:
    """The softmax probabilities (B, nh, T, L) in fp32 that SDPA weighs the values with, written out.

    q: (B, nh, T, hs); k: (B, nkv, L, hs), shared by nh / nkv query heads each (GQA); mask as SDPA takes it
    (bool, True = may attend, or an additive float bias such as T5's); causal: SDPA's `is_causal` (queries
    aligned with the last T keys). Scores are q k^T * scale (default hs ** -0.5) in fp32, from q and k upcast.
    The fused kernels never form this matrix; `lmforge.inspect` calls this only for a call that asks for it.
    """
    nh, nkv = q.shape[1], k.shape[1]
    if nkv != nh:
        k = k.repeat_interleave(nh // nkv, dim=1)  # query head i reads key head i // (nh / nkv), as SDPA's GQA
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    T, L = scores.shape[-2:]
    if mask is None and causal:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(-1)


def build_mask(key_valid: torch.Tensor | None, q_start: int, T: int, L: int, window: int | None,
               device: torch.device, n_global: int = 0) -> torch.Tensor:
    """Boolean (B or 1, 1, T, L) mask, True = may attend, for queries at slots q_start..q_start+T-1.

    A query sees keys at slots <= its own, within `window` of it (or among the first `n_global` slots: the
    global tokens of Longformer, Beltagy et al. 2020, causal here), and not padding. Every query also sees
    itself, so a padding query never has an all-masked row (that would give NaN, and NaN times a zero
    weight is still NaN when later layers read that slot).
    """
    q = torch.arange(q_start, q_start + T, device=device).unsqueeze(1)  # (T, 1)
    k = torch.arange(L, device=device).unsqueeze(0)  # (1, L)
    allowed = k <= q
    if window is not None:
        allowed = allowed & ((q - k < window) | (k < n_global))
    allowed = allowed.unsqueeze(0)  # (1, T, L)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, :L]) | (k == q).unsqueeze(0)
    return allowed.unsqueeze(1)  # (B, 1, T, L)
