"""A paged KV cache: keys and values live in fixed-size blocks handed out as sequences grow.

A static cache (`models.cache.Cache`) reserves `batch x max_len` slots up front; a server whose
sequences come and go at different lengths would reserve the context for each of them. Here every layer
has one pool of token slots, grouped in blocks of `block_tokens`; a sequence owns a list of blocks (its
block table, as in vLLM's PagedAttention, Kwon et al. 2023) and takes another only when it fills the last.
The pool itself grows on demand up to a cap, so memory follows the tokens in use.

`PagedBatch` is what the model sees for one forward pass: the interface of `models.cache.Cache`
(`layers`, each with `update(k, v, start)`, and `length`, `max_len`, `next_pos`, `key_mask`,
`has_padding`). It presents the batch's sequences as if they were left-padded rows of a static cache
(each row's keys right-aligned, shorter rows masked on the left), so the model's position and mask logic
runs unchanged; `update` writes the new keys into their slots and gathers each row's keys from its blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.config import Config

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
    """The cache object for one forward pass over several sequences, each adding `T` tokens.

    Rows are presented as a left-padded static cache of `length + T` slots, `length` being the longest
    sequence's stored tokens: row i's keys sit in the last `n_i + T` slots and `key_mask` hides the rest.
    Every sequence must already have room reserved for its `T` new tokens.
    """

    def __init__(self, pool: BlockPool, seqs: list[SeqBlocks], T: int):
        self.pool = pool
        lengths = [s.length for s in seqs]
        B, Lmax = len(seqs), max(lengths)
        L = Lmax + T
        self.length, self.max_len, self.T = Lmax, L, T
        self.next_pos = torch.tensor(lengths, dtype=torch.long, device=pool.device)
        self.has_padding = any(n != Lmax for n in lengths)
        self.key_mask = torch.ones(B, L, dtype=torch.bool)
        # a fresh batch (nothing stored yet) needs no gather: attention reads the new keys themselves
        self.gather = None
        if Lmax:
            self.gather = torch.full((B, L), PAD_SLOT, dtype=torch.long)
        write = []
        for i, s in enumerate(seqs):
            n = s.length
            if n + T > s.capacity:
                raise RuntimeError("PagedBatch: a sequence has no room reserved for its new tokens")
            if n != Lmax:
                self.key_mask[i, :Lmax - n] = False
            if self.gather is not None:
                self.gather[i, Lmax - n:] = s.slots[:n + T]
            write.append(s.slots[n:n + T])
        self.write = torch.cat(write).to(pool.device)  # (B * T,) slots of the new tokens, row-major
        self.key_mask = self.key_mask.to(pool.device)
        if self.gather is not None:
            self.gather = self.gather.view(-1).to(pool.device)
            # one gather buffer for keys and one for values, reused by every layer of this pass: a layer's
            # attention has read them before the next layer's update overwrites them
            shape = (B * L, pool.n_kv_head, pool.head_dim)
            self._kbuf = torch.empty(shape, dtype=pool.dtype, device=pool.device)
            self._vbuf = torch.empty(shape, dtype=pool.dtype, device=pool.device)
        numpy_ok = pool.device.type == "cpu" and pool.dtype in (torch.float32, torch.float16, torch.float64)
        self._np_gather = self.gather.numpy() if self.gather is not None and numpy_ok else None
        self.B = B
        # the model hands each attention layer its own state object; here they all write to the pool
        self.layers = [_LayerView(self, i) for i in range(pool.n_layer)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) in their slots; return every row's keys and values (B, nkv, L, hs)."""
        B, nkv, T, hs = k.shape
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        kk = k.transpose(1, 2).reshape(B * T, nkv, hs).to(pk.dtype)
        vv = v.transpose(1, 2).reshape(B * T, nkv, hs).to(pv.dtype)
        pk.index_copy_(0, self.write, kk)
        pv.index_copy_(0, self.write, vv)
        if self.gather is None:
            return kk.view(B, T, nkv, hs).transpose(1, 2), vv.view(B, T, nkv, hs).transpose(1, 2)
        L = self.max_len
        if self._np_gather is not None:
            # numpy's take is single-threaded: on 2 busy cores PyTorch's 2-thread index_select measured
            # 7-25 ms for a 4 MB gather against 1.3 ms here (OpenMP threads spin-waiting for each other)
            for src, dst in ((pk, self._kbuf), (pv, self._vbuf)):
                np.take(src.view(src.shape[0], -1).numpy(), self._np_gather, axis=0,
                        out=dst.view(dst.shape[0], -1).numpy(), mode="clip")
            k, v = self._kbuf, self._vbuf
        else:
            k = torch.index_select(pk, 0, self.gather, out=self._kbuf)
            v = torch.index_select(pv, 0, self.gather, out=self._vbuf)
        return k.view(B, L, nkv, hs).transpose(1, 2), v.view(B, L, nkv, hs).transpose(1, 2)

    def commit(self, seqs: list[SeqBlocks]) -> None:
        """After the forward pass: each sequence now stores T more tokens."""
        for s in seqs:
            s.length += self.T


class _LayerView:
    """One layer's face of a `PagedBatch`, with the interface of the model's per-layer `KVState`."""

    __slots__ = ("batch", "layer")

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch, self.layer = batch, layer

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch.update(self.layer, k, v)

    def bytes(self) -> int:
        return 0  # the pool holds the memory
