"""Token mixers and channel mixers: the two halves of every block, each chosen by config.

A block (`lmforge.models.decoder.Block`) is a **token mixer** (mixes information across positions:
attention, and the families of issue 11: SSMs, linear attention, RWKV time-mix, retention; the
classical LSTM) followed by
a **channel mixer** (per position: MLP, mixture of experts, RWKV channel-mix), with one norm/residual
rule around them. `Config.block` ("token+channel") picks the default for every layer and
`Config.layers` (one such string per layer) overrides it, e.g. Jamba's interleaving.

The interface every mixer implements (one file per mixer in this package):

    forward(x, ctx, state) -> y          x, y: (B, T, C)
        ctx:   `MixerContext`, shared by all layers of one forward pass (positions, rope tables,
               attention mask, padding, first slot).
        state: the layer's decode state (see below) or None for a full-sequence pass without cache.
               A mixer reads what its earlier calls left there and advances it by T tokens in place.
    new_state(batch_size, max_len, dtype, device) -> state      (token mixers only)
        One object per layer, held by `lmforge.models.cache.Cache`: `KVState` (keys/values) for
        attention, a fixed-size recurrent state (a `RecurrentState`) for SSM/linear-attention/RWKV/
        RetNet. It offers `bytes() -> int`, `reorder(rows, length)` and `repeat_rows(n)` (beam search);
        the generator never looks inside it.

Channel mixers are called with the same `(x, ctx, state)` (the layer's state, which only stateful
ones such as RWKV channel-mix read). Class attributes: `attr`, the block attribute holding it (its
state-dict prefix, e.g. `blocks.0.attn.`), and `resid_projs`, names of the linears writing back
into the residual stream (scaled at GPT-2 init). A mixer may report an auxiliary loss through `aux_loss`
(a 0-d tensor, or None), which `DecoderLM.aux_loss()` sums for the training objective.

Left padding: `ctx.pad` is (B, T) bool, True at real tokens, or None when no row is padded. A
recurrent mixer zeroes its input at padding so its state is exactly what the real tokens build.
"""

from __future__ import annotations

import torch


class RecurrentState:
    """Base of fixed-size decode states: every tensor attribute has the batch as its first dimension."""

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def bytes(self) -> int:
        """Memory held by the state (the same at every position)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def reorder(self, rows: torch.Tensor, length: int = 0) -> None:
        """Row i takes over row `rows[i]`'s state (beam search)."""
        for k, t in self._tensors().items():
            setattr(self, k, t[rows].clone())

    def repeat_rows(self, n: int) -> RecurrentState:
        """A copy in which each row appears `n` times in a row."""
        new = object.__new__(type(self))
        new.__dict__.update({k: t.repeat_interleave(n, 0) for k, t in self._tensors().items()})
        return new


class MixerContext:
    """What all layers of one forward pass share.

    positions: (B, T) position ids; rope: (cos, sin) tables or None; mask: attention mask
    (B or 1, 1, T, L) bool, or float scores to add (T5's relative bias), or None for plain causal; pad:
    (B, T) bool or None; start: slot of the first of these T tokens in the cache (0 without one).
    memory: (B, S, C) an encoder's output that cross-attention reads, memory_mask: (B, S) bool, True at its
    real tokens (None: all real); both None when the cache already holds the cross keys/values.
    """

    __slots__ = ("positions", "rope", "mask", "pad", "start", "memory", "memory_mask")

    def __init__(self, positions: torch.Tensor, rope, mask: torch.Tensor | None, pad: torch.Tensor | None,
                 start: int, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None):
        self.positions, self.rope, self.mask, self.pad, self.start = positions, rope, mask, pad, start
        self.memory, self.memory_mask = memory, memory_mask


def token_mixers() -> dict[str, type]:
    """Token mixer classes by config name."""
    from lmforge.models.mixers.attention import Attention
    from lmforge.models.mixers.linear_attention import LinearAttention
    from lmforge.models.mixers.lsh import LSHAttention
    from lmforge.models.mixers.lstm import LSTM
    from lmforge.models.mixers.mamba import Mamba
    from lmforge.models.mixers.retention import Retention
    from lmforge.models.mixers.rwkv import RWKVTimeMix
    from lmforge.models.mixers.s4d import S4D
    from lmforge.models.mixers.xl import XLAttention
    return {"attention": Attention, "mamba": Mamba, "s4d": S4D, "linear_attention": LinearAttention,
            "retention": Retention, "rwkv": RWKVTimeMix, "lstm": LSTM, "lsh_attention": LSHAttention,
            "xl_attention": XLAttention}


def channel_mixers() -> dict[str, type]:
    """Channel mixer classes by config name ("none": the block has no channel mixer, as Mamba's)."""
    from lmforge.models.layers import MLP
    from lmforge.models.mixers.moe import MoE
    from lmforge.models.mixers.rwkv import RWKVChannelMix
    return {"mlp": MLP, "moe": MoE, "rwkv": RWKVChannelMix}
