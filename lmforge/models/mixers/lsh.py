"""LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer", section 2).

Shared-QK attention: one projection gives x -> qk; a query is qk_i, a key is qk_j / |qk_j|, and the score
is q_i . k_j / sqrt(d). Each of `n_hashes` rounds hashes every qk by a random rotation R (d, n_buckets/2)
(angular LSH): h(x) = argmax([xR; -xR]), so vectors at a small angle share a bucket. The paper's target is

    o_i = softmax over P_i = {j <= i : h_r(q_i) = h_r(k_j) in some round r} of q_i . k_j / sqrt(d),

with a token attending to itself only when nothing else is in P_i (its score is -1e5, eq. 3's self mask).

Training form (chunked, O(T * chunk) per round): per round, tokens are sorted by (bucket, position) and
cut into chunks of `chunk_len`; a chunk's queries attend to keys of their own bucket in it and in the
previous chunk. Each round r gives o_i^r and its log-normaliser l_i^r; a key met in several rounds is
weighted down by log N_ij (the rounds in which i and j share a bucket, eq. 4's m(j, P_i)), and the rounds
combine as o_i = sum_r exp(l_i^r - logsumexp_r l_i^r) o_i^r. Whenever no bucket holds more than `chunk_len`
tokens, every j in P_i lies in i's window and this is *exactly* the attention over P_i above; a larger
bucket loses its earliest keys (the Reformer approximation).

Decode form (state given, tokens after the prompt): exact attention of the new queries over P_i read from a
cache of the keys, values and bucket codes of all earlier tokens (`LSHState`, O(T) per token). It equals the
chunked pass whenever no bucket overflowed a chunk (tested); the prompt itself runs the chunked form.

Rotations are fixed, drawn from `lsh.seed` (the paper redraws them per step in training); they are not
parameters, so a saved model reloads with the very same hashing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.models.layers import apply_rope
from lmforge.models.mixers.base import MixerContext

_SELF = -1e5  # eq. 3: a token sees itself only when no other key is available
_MASKED = -1e9  # finite, so a row whose every key is masked cannot give NaN


class LSHState:
    """Keys (unnormalised shared qk), values and bucket codes of every cached token, per layer.

    k, v: (B, H, max_len, hs); buckets: (B, H, R, max_len) with -1 at padding (it matches no query).
    Filled left to right like `KVState`; stale slots past the cache length are never read.
    """

    def __init__(self, batch_size: int, n_head: int, n_hashes: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.k = torch.zeros(batch_size, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.buckets = torch.full((batch_size, n_head, n_hashes, max_len), -1, dtype=torch.long, device=device)

    def update(self, k, v, buckets, start: int):
        """Write T tokens at slots start..start+T-1; return views of slots 0..start+T-1."""
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.buckets[..., start:end] = buckets
        return self.k[:, :, :end], self.v[:, :, :end], self.buckets[..., :end]

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Row i takes over row `rows[i]`'s first `length` slots (beam search)."""
        self.k[:, :, :length] = self.k[rows, :, :length]
        self.v[:, :, :length] = self.v[rows, :, :length]
        self.buckets[..., :length] = self.buckets[rows, ..., :length]

    def repeat_rows(self, n: int) -> LSHState:
        """A copy in which each row appears `n` times in a row."""
        new = object.__new__(LSHState)
        new.k, new.v = self.k.repeat_interleave(n, 0), self.v.repeat_interleave(n, 0)
        new.buckets = self.buckets.repeat_interleave(n, 0)
        return new

    def bytes(self) -> int:
        """Memory held by the cache (grows with max_len, as a KV cache)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.buckets))


def hash_vectors(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH buckets of x (B, H, T, d) under rotations (R, d, n_buckets/2) -> (B, H, R, T) long.

    One bucket (rotations with 0 columns) puts every vector in bucket 0."""
    R, _, half = rotations.shape
    if half == 0:
        return torch.zeros(*x.shape[:2], R, x.shape[2], dtype=torch.long, device=x.device)
    rot = torch.einsum("bhtd,rdn->bhrtn", x, rotations.to(x.dtype))  # (B, H, R, T, nb/2)
    return torch.cat([rot, -rot], dim=-1).argmax(dim=-1)


def _normalized_keys(qk: torch.Tensor) -> torch.Tensor:
    d = qk.shape[-1]
    return F.normalize(qk, dim=-1) / math.sqrt(d)  # the 1/sqrt(d) score scale folded into the keys


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, chunk_len: int,
                  return_overflow: bool = False):
    """Chunked causal LSH attention. qk, v: (B, H, T, d); buckets: (B, H, R, T), -1 for padding keys.

    T must be a multiple of chunk_len (the mixer pads). Returns (B, H, T, d) [and whether some bucket of
    some round held more tokens than chunk_len, i.e. the result may miss keys of P_i]."""
    B, H, T, d = qk.shape
    R = buckets.shape[2]
    c = chunk_len
    n = T // c
    pos = torch.arange(T, device=qk.device)
    # sort each round by (bucket, position); padding (-1) sorts last and matches no real query's bucket
    key = torch.where(buckets < 0, torch.iinfo(torch.long).max // (2 * T), buckets) * T + pos  # (B, H, R, T)
    perm = key.argsort(dim=-1)  # sorted slot -> original position
    s_pos = perm  # (B, H, R, T) positions in sorted order
    s_bkt = buckets.gather(-1, perm)
    idx = perm.unsqueeze(-1).expand(-1, -1, -1, -1, d)
    s_q = qk.unsqueeze(2).expand(-1, -1, R, -1, -1).gather(3, idx)  # (B, H, R, T, d)
    s_v = v.unsqueeze(2).expand(-1, -1, R, -1, -1).gather(3, idx)
    s_k = _normalized_keys(s_q)

    def chunks(t):  # (B, H, R, T, ...) -> (B, H, R, n, c, ...)
        return t.reshape(B, H, R, n, c, *t.shape[4:])

    def window(t):  # keys of this chunk and the one before: (B, H, R, n, w, ...), w = 2c (c when n == 1)
        t = chunks(t)
        if n == 1:
            return t
        # chunk 0 looks back at the last chunk: later positions or other buckets, so masked entirely
        return torch.cat([t.roll(1, dims=3), t], dim=4)

    q, qpos, qb = chunks(s_q), chunks(s_pos), chunks(s_bkt)
    k, kpos, kb, vv = window(s_k), window(s_pos), window(s_bkt), window(s_v)
    scores = q @ k.transpose(-1, -2)  # (B, H, R, n, c, w)
    allowed = (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)) & (kb.unsqueeze(-2) == qb.unsqueeze(-1))
    if R > 1:  # a key met in N_ij rounds counts 1 / N_ij in each (every bucket code of both tokens compared)
        all_b = buckets.permute(0, 1, 3, 2)  # (B, H, T, R)
        bq = all_b.gather(2, s_pos.reshape(B, H, R * T, 1).expand(-1, -1, -1, R)).view(B, H, R, n, c, R)
        bk = window(all_b.gather(2, s_pos.reshape(B, H, R * T, 1).expand(-1, -1, -1, R)).view(B, H, R, T, R))
        shared = (bq.unsqueeze(-2) == bk.unsqueeze(-3)).sum(-1).clamp(min=1)  # (B, H, R, n, c, w)
        scores = scores - shared.to(scores.dtype).log()
    scores = scores.masked_fill(~allowed, _MASKED)
    scores = scores.masked_fill(kpos.unsqueeze(-2) == qpos.unsqueeze(-1), _SELF)
    lse = scores.logsumexp(-1, keepdim=True)  # (B, H, R, n, c, 1)
    o = torch.exp(scores - lse) @ vv  # (B, H, R, n, c, d)
    # back to token order, then combine the rounds by their normalisers
    undo = perm.argsort(dim=-1)
    o = o.reshape(B, H, R, T, d).gather(3, undo.unsqueeze(-1).expand(-1, -1, -1, -1, d))
    lse = lse.reshape(B, H, R, T).gather(3, undo)
    y = (o * lse.softmax(dim=2).unsqueeze(-1)).sum(2)  # (B, H, T, d)
    if not return_overflow:
        return y
    same = s_bkt[..., 1:] == s_bkt[..., :-1]
    run = torch.zeros_like(s_bkt)  # position of each token within its bucket's run, per round
    starts = torch.where(~same, torch.arange(1, T, device=qk.device), 0)
    run[..., 1:] = torch.arange(1, T, device=qk.device) - starts.cummax(-1).values
    return y, bool(((run >= c) & (s_bkt >= 0)).any())


def lsh_attention_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
                        k_buckets: torch.Tensor, q_start: int) -> torch.Tensor:
    """Attention of queries q (B, H, T, d) at slots q_start.. over every earlier key sharing a bucket in some
    round: the set P_i itself, no chunks. k, v: (B, H, L, d) unnormalised shared qk and values; buckets
    (B, H, R, T) and (B, H, R, L), -1 at padding. The decode form, and the definition the tests check against."""
    T, L = q.shape[2], k.shape[2]
    scores = q @ _normalized_keys(k).transpose(-1, -2)  # (B, H, T, L)
    match = (q_buckets.unsqueeze(-1) == k_buckets.unsqueeze(-2)).any(dim=2)  # (B, H, T, L)
    qpos = torch.arange(q_start, q_start + T, device=q.device).unsqueeze(1)
    kpos = torch.arange(L, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(~(match & (kpos <= qpos)), _MASKED).masked_fill(kpos == qpos, _SELF)
    return scores.softmax(-1) @ v


class LSHAttention(nn.Module):
    """Multi-head causal LSH self-attention with shared QK (`lsh_attention` token mixer).

    Config: `lsh.n_buckets` (even, or 1), `lsh.n_hashes` rounds, `lsh.chunk_len`, `lsh.seed`. Projections:
    `qk` and `v` fused in `qkv` (2 x heads x hs outputs), `proj` back to d_model.
    """

    attr = "attn"
    resid_projs = ("proj",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """Problems with the `lsh` settings and the attention settings LSH cannot honour."""
        h, out = cfg.lsh, []
        if not (isinstance(h.n_buckets, int) and (h.n_buckets == 1 or (h.n_buckets >= 2 and h.n_buckets % 2 == 0))):
            out.append(f"lsh.n_buckets must be 1 or a positive even number (random rotations give n_buckets/2 "
                       f"directions and their negatives), got {h.n_buckets!r}")
        if not (isinstance(h.n_hashes, int) and h.n_hashes > 0):
            out.append(f"lsh.n_hashes must be positive, got {h.n_hashes!r}")
        if not (isinstance(h.chunk_len, int) and h.chunk_len > 0):
            out.append(f"lsh.chunk_len must be positive, got {h.chunk_len!r}")
        elif cfg.block_size % h.chunk_len != 0:
            out.append(f"block_size ({cfg.block_size}) must be a multiple of lsh.chunk_len ({h.chunk_len}): "
                       "full-length sequences are cut into whole chunks")
        if cfg.n_kv_head != cfg.n_head:
            out.append("lsh_attention shares queries and keys (one qk per head): set attention.n_kv_head = "
                       "attention.n_head")
        if cfg.attention.sliding_window is not None:
            out.append("lsh_attention has no sliding window: unset attention.sliding_window")
        return out

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        lsh = cfg.lsh
        self.n_buckets, self.n_hashes, self.chunk_len = lsh.n_buckets, lsh.n_hashes, lsh.chunk_len
        self.qkv = nn.Linear(cfg.d_model, 2 * self.n_head * self.head_dim, bias=cfg.attention.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.attention.out_bias)
        g = torch.Generator().manual_seed(lsh.seed)
        half = lsh.n_buckets // 2 if lsh.n_buckets > 1 else 0
        self.register_buffer("rotations", torch.randn(lsh.n_hashes, self.head_dim, half, generator=g),
                             persistent=False)
        self.last_overflow = False  # whether the last chunked pass had a bucket larger than a chunk

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> LSHState:
        """An empty key/value/bucket cache for `max_len` slots."""
        return LSHState(batch_size, self.n_head, self.n_hashes, max_len, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: LSHState | None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hs = self.n_head, self.head_dim
        qk, v = self.qkv(x).view(B, T, 2, nh, hs).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        if ctx.rope is not None:
            qk = apply_rope(qk, *ctx.rope)  # the same rotation serves the token as query and as key
        buckets = hash_vectors(qk, self.rotations)  # (B, nh, R, T)
        if ctx.pad is not None:  # padding keys match no bucket
            buckets = buckets.masked_fill(~ctx.pad[:, None, None, :], -1)
        if state is not None and ctx.start > 0:  # decode: exact attention over the cache
            q = qk.to(state.k.dtype)
            k, vv, kb = state.update(q, v.to(state.k.dtype), buckets, ctx.start)
            y = lsh_attention_exact(q, k, vv, buckets, kb, ctx.start)
        else:
            if state is not None:
                state.update(qk.to(state.k.dtype), v.to(state.k.dtype), buckets, 0)
            pad = (-T) % self.chunk_len  # pad to whole chunks with tokens in no bucket (sorted last)
            if pad:
                qk, v = F.pad(qk, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
                buckets = F.pad(buckets, (0, pad), value=-1)
            y, self.last_overflow = lsh_attention(qk, v, buckets, self.chunk_len, return_overflow=True)
            y = y[:, :, :T]
        y = y.transpose(1, 2).reshape(B, T, nh * hs)
        return self.proj(y.to(x.dtype))
