"""The decode cache of a whole model: one state object per layer plus shared bookkeeping.

Each layer's token mixer makes its own state (`new_state`): `KVState` for attention, a fixed-size
recurrent state for recurrent mixers. The generator only creates a cache (`DecoderLM.new_cache`) and
passes it back with every call, so it runs any family the same way.
"""

from __future__ import annotations

import copy

import torch

from lmforge.errors import ConfigError


class Cache:
    """Per-layer decode states and what all layers share.

    Every row of a batch shares the slot index (prompts are left-padded), so a decode step writes one
    slot for all rows; `key_mask` marks which slots hold real tokens and `next_pos` is each row's next
    position id (it differs between rows when their prompts differ in length). `length` counts slots
    filled, `max_len` is the capacity (the most tokens prompt + generation may reach).
    """

    def __init__(self, layers: list, batch_size: int, max_len: int, device: torch.device | str = "cpu"):
        self.layers = layers
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled
        self.max_len = max_len
        self.has_padding = False

    @property
    def k(self) -> list[torch.Tensor]:
        """Key buffers of the layers that keep keys (attention layers), in layer order."""
        return [s.k for s in self.layers if hasattr(s, "k")]

    @property
    def v(self) -> list[torch.Tensor]:
        """Value buffers of the layers that keep values (attention layers), in layer order."""
        return [s.v for s in self.layers if hasattr(s, "v")]

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i hold what row `rows[i]` held (beam search: each beam continues its parent's cache).
        Only the filled slots are copied."""
        L = self.length
        for s in self.layers:
            if hasattr(s, "reorder"):
                s.reorder(rows, L)
            else:  # a recurrent state: every tensor in it is per row
                for name, t in list(vars(s).items()):
                    if isinstance(t, torch.Tensor):
                        setattr(s, name, t[rows])
        self.key_mask[:, :L] = self.key_mask[rows, :L]
        self.next_pos = self.next_pos[rows]

    def repeat_rows(self, n: int) -> Cache:
        """A new cache in which each row of this one appears `n` times in a row (one prompt's prefill
        shared by its n beams)."""
        new = object.__new__(Cache)
        new.__dict__.update(self.__dict__)
        new.layers = [s.repeat_rows(n) if hasattr(s, "repeat_rows") else _repeat_state(s, n) for s in self.layers]
        new.key_mask = self.key_mask.repeat_interleave(n, 0)
        new.next_pos = self.next_pos.repeat_interleave(n, 0)
        return new

    def rollback(self, n: int) -> None:
        """Forget the last `n` slots of every row (speculative decoding: rejected draft tokens). Key/value
        slots are simply overwritten by the next update, as attention only reads filled slots; a state
        that has folded the tokens in (a recurrent one) cannot forget them."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} cached slots")
        if n and not all(hasattr(s, "k") for s in self.layers):
            raise ConfigError("this model has layers with a recurrent state, which cannot be rolled back; "
                              "speculative decoding needs attention layers only")
        self.length -= n
        self.next_pos -= n

    def new_segment(self) -> None:
        """Let the next call start a new segment of the same streams (segment-recurrent training).

        Slot bookkeeping restarts at 0, so a stream of any length runs through a cache sized for one segment;
        states that carry memory across segments (Transformer-XL's, recurrent ones) keep it, detached so that
        gradients stop at the boundary (the paper's stop-gradient, truncated backpropagation). A KV cache
        cannot restart: its keys would be lost, so a model with plain attention layers is refused."""
        if any(hasattr(s, "k") for s in self.layers):
            raise ConfigError("segment recurrence needs layers that carry a memory (xl_attention) or a recurrent "
                              "state; this model has key/value-cache attention layers (train it with causal_lm)")
        for s in self.layers:
            for name, t in list(vars(s).items()):
                if isinstance(t, torch.Tensor):
                    setattr(s, name, t.detach())
        self.length = 0
        self.key_mask.zero_()
        self.next_pos.zero_()
        self.has_padding = False

    def bytes(self) -> int:
        """Memory held by all layers' states."""
        return sum(s.bytes() for s in self.layers)


def _repeat_state(state, n: int):
    """A copy of a recurrent layer state with each row repeated `n` times."""
    new = copy.copy(state)
    for name, t in list(vars(state).items()):
        if isinstance(t, torch.Tensor):
            setattr(new, name, t.repeat_interleave(n, 0))
    return new
