"""A paged KV cache: keys and values live in fixed-size blocks handed out as sequences grow.

A static cache (`models.cache.Cache`) reserves `batch x max_len` slots up front; a server whose
sequences come and go at different lengths would reserve the context for each of them. Here every layer
has one pool of token slots, grouped in blocks of `block_tokens`; a sequence owns a list of blocks (its
block table, as in vLLM's PagedAttention, Kwon et al. 2023) and takes another only when it fills the last.
The pool itself grows on demand up to a cap, so memory follows the tokens in use.

`PagedBatch` is what the model sees for one forward pass over several sequences, each adding its own
number of tokens: one decode token, or a chunk of a prompt. Their tokens are packed into one row (no
padding: the linear layers, most of the work, run on exactly the tokens there are), `positions` gives each
token's position, and every attention layer hands its queries, keys and values to the batch's `attend`,
which stores the new keys and values in their slots and attends within each sequence: the rows adding one
token together in one batched call over their gathered keys, each prompt chunk on its own (causal over
what its sequence stored before plus the chunk itself). This is the varlen batching of vLLM / Sarathi
(Agrawal et al. 2023): prefills of several requests and chunks of long ones share steps with decoding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import Config
from lmforge.models.mixers.attention import build_mask

PAD_SLOT = 0  # block 0 is never handed out: its zeroed slot 0 fills the left padding of shorter rows


class BlockPool:
    """Per-layer key/value slots `(slots, n_kv_head, head_dim)`, handed out in blocks of `block_tokens`.

    Storage starts at `initial_blocks` and doubles when a block is needed and none is free, up to
    `max_blocks` (then `allocate` returns None and the caller must wait or free some).
    """

    def __init__(self, cfg: Config, block_tokens: int, max_blocks: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", initial_blocks: int = 64):
        if block_tokens < 1 or max_blocks < 2:
            raise ValueError("a block pool needs block_tokens >= 1 and max_blocks >= 2 (block 0 is reserved)")
        self.block_tokens, self.max_blocks = block_tokens, max_blocks
        self.n_layer, self.n_kv_head, self.head_dim = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        self.window, self.n_global = cfg.attention.sliding_window, cfg.attention.global_tokens
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.free: list[int] = []
        self._grow(min(max(initial_blocks, 2), max_blocks))

    def _grow(self, blocks: int) -> None:
        shape = (blocks * self.block_tokens, self.n_kv_head, self.head_dim)
        old = self.capacity * self.block_tokens
        k, v = [], []
        for i in range(self.n_layer):
            for new, src in ((k, self.k), (v, self.v)):
                t = torch.empty(shape, dtype=self.dtype, device=self.device)
                if old:
                    t[:old] = src[i]
                else:
                    t[:self.block_tokens] = 0  # the padding block
                new.append(t)
        self.k, self.v = k, v
        # newest blocks last in the list and popped first: LIFO keeps a small working set warm
        self.free = list(range(blocks - 1, max(self.capacity, 1) - 1, -1)) + self.free
        self.capacity = blocks

    def allocate(self) -> int | None:
        """A free block id, growing the storage if needed; None when the cap is reached."""
        if not self.free and self.capacity < self.max_blocks:
            self._grow(min(self.max_blocks, 2 * self.capacity))
        return self.free.pop() if self.free else None

    def release(self, blocks: list[int]) -> None:
        """Give blocks back to the pool."""
        self.free.extend(reversed(blocks))

    @property
    def blocks_in_use(self) -> int:
        """Blocks held by sequences (the reserved padding block not counted)."""
        return self.capacity - 1 - len(self.free)

    @property
    def blocks_available(self) -> int:
        """Blocks that can still be handed out: free ones plus those the pool may still grow by."""
        return len(self.free) + self.max_blocks - self.capacity

    def bytes(self) -> int:
        """Memory held by the key/value storage."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_block(self) -> int:
        """Memory one block takes across all layers, keys and values."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_layer * self.block_tokens * self.n_kv_head * self.head_dim * size


class SeqBlocks:
    """One sequence's block table and the slot of each of its tokens."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.slots = torch.empty(0, dtype=torch.long)  # slot of token j at [j], for the reserved capacity
        self.length = 0  # tokens whose keys are stored

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_tokens

    def reserve(self, n_tokens: int) -> bool:
        """Make room for `n_tokens` in all; False (holding what it got) when the pool is exhausted."""
        bt = self.pool.block_tokens
        new = []
        while self.capacity + len(new) * bt < n_tokens:
            b = self.pool.allocate()
            if b is None:
                self.pool.release(new)
                return False
            new.append(b)
        if new:
            self.blocks += new
            offs = torch.arange(bt, dtype=torch.long)
            self.slots = torch.cat([self.slots, *(b * bt + offs for b in new)])
        return True

    def blocks_needed(self, n_tokens: int) -> int:
        """Blocks still to allocate to hold `n_tokens`."""
        bt = self.pool.block_tokens
        return max(0, -(-n_tokens // bt) - len(self.blocks))

    def release(self) -> None:
        """Give all blocks back."""
        self.pool.release(self.blocks)
        self.blocks, self.slots, self.length = [], torch.empty(0, dtype=torch.long), 0


class PagedBatch:
    """The cache object for one packed forward pass: sequence i adds `counts[i]` tokens.

    The model reads `packed` (so it takes the packed path), `positions` (N,) and `layers` (one
    `_LayerView` per layer, whose `attend` the attention layer calls). Rows adding a single token must come
    first (the engine puts its decode rows there): they attend together in one batched call. Every
    sequence must already have room reserved for its new tokens; `commit` records them afterwards.
    """

    packed = True

    def __init__(self, pool: BlockPool, seqs: list[SeqBlocks], counts: list[int]):
        if len(seqs) != len(counts) or not seqs or min(counts) < 1:
            raise ValueError("PagedBatch: one count >= 1 per sequence")
        self.pool, self.seqs, self.counts = pool, seqs, counts
        device = pool.device
        lengths = [s.length for s in seqs]
        write, pos = [], []
        for s, n, c in zip(seqs, lengths, counts):
            if n + c > s.capacity:
                raise RuntimeError("PagedBatch: a sequence has no room reserved for its new tokens")
            write.append(s.slots[n:n + c])
            pos.append(torch.arange(n, n + c))
        self.write = torch.cat(write).to(device)  # (N,) slots of the new tokens, in packed order
        self.positions = torch.cat(pos).to(device)  # (N,)
        self.N = len(self.write)
        # the leading rows that add one token each: one batched attention call over left-padded keys
        self.n_single = next((i for i, c in enumerate(counts) if c != 1), len(counts))
        self._single = self._plan_single(lengths[:self.n_single]) if self.n_single else None
        # the other rows (prompt chunks): their span in the packed row, and gather indices when they
        # continue keys stored by an earlier step
        self._chunks = []
        off = self.n_single
        for s, n, c in zip(seqs[self.n_single:], lengths[self.n_single:], counts[self.n_single:]):
            gather = s.slots[:n + c].to(device) if n else None
            mask = None
            if n or (self.pool.window is not None and c > self.pool.window):
                mask = build_mask(None, n, c, n + c, pool.window, device, pool.n_global)
            self._chunks.append((off, c, gather, mask))
            off += c
        numpy_ok = device.type == "cpu" and pool.dtype in (torch.float32, torch.float16, torch.float64)
        self._np = numpy_ok
        # the model hands each attention layer its own state object; here they all write to the pool
        self.layers = [_LayerView(self, i) for i in range(pool.n_layer)]

    def _plan_single(self, lengths: list[int]) -> tuple:
        """Gather indices and mask for the one-token rows: row i's n_i + 1 keys right-aligned in L slots."""
        pool, device = self.pool, self.pool.device
        B, L = len(lengths), max(lengths) + 1
        gather = torch.full((B, L), PAD_SLOT, dtype=torch.long)
        kpos = torch.arange(L).expand(B, L) - torch.tensor([L - 1 - n for n in lengths])[:, None]  # key positions
        for i, (s, n) in enumerate(zip(self.seqs, lengths)):
            gather[i, L - 1 - n:] = s.slots[:n + 1]
        allowed = kpos >= 0  # left padding is no key
        qpos = torch.tensor(lengths)[:, None]
        if pool.window is not None:
            allowed &= (qpos - kpos < pool.window) | ((kpos >= 0) & (kpos < pool.n_global))
        mask = None if bool(allowed.all()) else allowed[:, None, None, :].to(device)  # (B, 1, 1, L)
        gather = gather.view(-1).to(device)
        shape = (B * L, pool.n_kv_head, pool.head_dim)
        # one gather buffer for keys and one for values, reused by every layer of this pass: a layer's
        # attention has read them before the next layer overwrites them
        kbuf = torch.empty(shape, dtype=pool.dtype, device=device)
        vbuf = torch.empty(shape, dtype=pool.dtype, device=device)
        return B, L, gather, gather.numpy() if device.type == "cpu" else None, mask, kbuf, vbuf

    def _gather(self, src: torch.Tensor, index: torch.Tensor, index_np, out: torch.Tensor | None = None):
        if self._np and index_np is not None:
            # numpy's take is single-threaded: on 2 busy cores PyTorch's 2-thread index_select measured
            # 7-25 ms for a 4 MB gather against 1.3 ms here (OpenMP threads spin-waiting for each other)
            if out is None:
                out = torch.empty((len(index_np), *src.shape[1:]), dtype=src.dtype)
            np.take(src.view(src.shape[0], -1).numpy(), index_np, axis=0, out=out.view(out.shape[0], -1).numpy(),
                    mode="clip")
            return out
        return torch.index_select(src, 0, index, out=out) if out is not None else src.index_select(0, index)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
        """Store k, v (1, nkv, N, hs) in their slots; attention of q (1, nh, N, hs) within each sequence
        (softmax scale `scale`, default 1/sqrt(hs)), returned as (1, nh, N, hs) in the pool's dtype."""
        _, nkv, N, hs = k.shape
        nh = q.shape[1]
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        kk = k[0].transpose(0, 1).to(pk.dtype)  # (N, nkv, hs)
        vv = v[0].transpose(0, 1).to(pv.dtype)
        pk.index_copy_(0, self.write, kk)
        pv.index_copy_(0, self.write, vv)
        q = q.to(pk.dtype)
        gqa = nkv != nh
        out = []
        if self._single is not None:
            B, L, gather, gather_np, mask, kbuf, vbuf = self._single
            ks = self._gather(pk, gather, gather_np, kbuf).view(B, L, nkv, hs).transpose(1, 2)
            vs = self._gather(pv, gather, gather_np, vbuf).view(B, L, nkv, hs).transpose(1, 2)
            qs = q[0, :, :B].transpose(0, 1).unsqueeze(2)  # (B, nh, 1, hs)
            y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa, scale=scale)
            out.append(y.squeeze(2).transpose(0, 1).unsqueeze(0))  # (1, nh, B, hs)
        for off, c, gather, mask in self._chunks:
            qc = q[:, :, off:off + c]
            if gather is None:  # a fresh sequence: its keys are exactly the new ones
                kc = kk[off:off + c].transpose(0, 1).unsqueeze(0)
                vc = vv[off:off + c].transpose(0, 1).unsqueeze(0)
            else:
                g_np = gather.numpy() if self._np else None
                kc = self._gather(pk, gather, g_np).transpose(0, 1).unsqueeze(0)  # (1, nkv, n + c, hs)
                vc = self._gather(pv, gather, g_np).transpose(0, 1).unsqueeze(0)
            out.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, is_causal=mask is None and c > 1,
                                                      enable_gqa=gqa, scale=scale))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def commit(self) -> None:
        """After the forward pass: each sequence now stores its new tokens."""
        for s, c in zip(self.seqs, self.counts):
            s.length += c


class _LayerView:
    """One layer's face of a `PagedBatch`: the attention layer hands it its queries, keys and values."""

    __slots__ = ("batch", "layer")

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch, self.layer = batch, layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        return self.batch.attend(self.layer, q, k, v, scale)

    def bytes(self) -> int:
        return 0  # the pool holds the memory
