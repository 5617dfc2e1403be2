"""What every mixer shares: the base of fixed-size decode states and the per-forward context."""

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
