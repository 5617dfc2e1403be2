"""Batch sources: where the trainer's batches come from, with state that checkpoints restore exactly.

A source yields batch dicts (see `objectives`) from `next_batch()`, reports `state_dict()` (JSON-ready:
generator state, position, epoch) and resumes from `load_state_dict()`, so a resumed run draws the very
batches an uninterrupted run would. `eval_batches()` is deterministic and touches no training RNG.

- `TokenWindows`: random (block_size + 1)-token windows from a flat token array (an np.memmap shard).
- `PaddedSequences`: fixed-length padded sequences (teenyGPT's passages), shuffled once per epoch.

With several ranks (`shard(rank, world_size)`) every rank steps through the same global batch positions
(batch_size x world_size sequences per draw) and reads only its own slice of them: the ranks see distinct
data, and the state saved in a checkpoint is global, so a run resumes at any world size without replay.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import torch

from lmforge.data import sample_batch
from lmforge.errors import ConfigError
from lmforge.train.objectives import Batch


def _gen_state(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode()


def _set_gen_state(g: torch.Generator, s: str) -> None:
    g.set_state(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8))


class BatchSource:
    """Protocol of a training batch source (see the module docstring)."""

    epoch: int | None = None  # completed passes over the data, for sources that have epochs
    rank: int = 0
    world_size: int = 1

    def shard(self, rank: int, world_size: int) -> None:
        """Read only rank `rank`'s slice of each global batch of `batch_size * world_size` sequences.

        A source that has not implemented its slicing refuses (each rank would train on the same batches).
        """
        raise ConfigError(f"{type(self).__name__} cannot split its batches over {world_size} ranks yet; train it "
                          "with train.strategy: single")

    def _set_shard(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size

    def next_batch(self) -> Batch:
        """The next training batch."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-ready position and RNG state."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""
        raise NotImplementedError

    def eval_batches(self) -> Iterator[Batch]:
        """The validation batches, the same ones every time."""
        raise NotImplementedError


class TokenWindows(BatchSource):
    """Random windows of `block_size + 1` tokens from a 1-D token array: x = w[:-1], y = w[1:].

    Window starts come from a seeded `torch.Generator` (`lmforge.data.sample_batch`), as nanoGPT samples.
    `val_tokens` give the evaluation windows: `eval_batches` evenly spaced, non-overlapping batches.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int = 0,
                 val_tokens: np.ndarray | None = None, eval_batches: int = 8):
        if len(tokens) < block_size + 2:
            raise ValueError(f"the token array has {len(tokens)} tokens, fewer than one window of {block_size + 1}")
        self.tokens, self.val_tokens = tokens, val_tokens
        self.batch_size, self.block_size, self.n_eval = batch_size, block_size, eval_batches
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def shard(self, rank: int, world_size: int) -> None:
        """Every rank draws the global batch's window starts from the same generator and reads its slice."""
        self._set_shard(rank, world_size)

    def _windows(self, data: np.ndarray, starts) -> Batch:
        w = torch.from_numpy(np.stack([np.asarray(data[s:s + self.block_size + 1], dtype=np.int64) for s in starts]))
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def next_batch(self) -> Batch:
        """A batch of random windows (this rank's slice of the global draw)."""
        self.batches_drawn += 1
        if self.world_size == 1:
            x, y = sample_batch(self.tokens, self.batch_size, self.block_size, self.generator)
            return {"input_ids": x, "labels": y}
        # the same starts sample_batch draws for one process with the global batch; this rank reads its part
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size * self.world_size,),
                               generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        return {k: v.contiguous() for k, v in self._windows(self.tokens, mine).items()}

    def state_dict(self) -> dict:
        """Generator state and the number of batches drawn."""
        return {"kind": "token_windows", "generator": _gen_state(self.generator), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator so the next window is the one an uninterrupted run draws."""
        _set_gen_state(self.generator, state["generator"])
        self.batches_drawn = int(state["batches_drawn"])

    def eval_batches(self) -> Iterator[Batch]:
        """Up to `eval_batches` batches of non-overlapping windows spread evenly over the validation tokens.

        Batches are of the global micro-batch (batch_size x world_size), so every world size evaluates the
        same windows; the Trainer hands whole batches to the ranks in turn.
        """
        if self.val_tokens is None:
            return
        span, size = self.block_size + 1, self.batch_size * self.world_size
        n_windows = min(len(self.val_tokens) // span, self.n_eval * size)
        if n_windows == 0:
            return
        stride = (len(self.val_tokens) // span) // n_windows * span
        starts = [i * stride for i in range(n_windows)]
        for i in range(0, n_windows, size):
            yield self._windows(self.val_tokens, starts[i:i + size])


def pad_sequences(seqs: list[list[int]], length: int, pad_id: int) -> torch.Tensor:
    """(N, length) LongTensor of `seqs` right-padded with `pad_id` (each must fit)."""
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the length {length}")
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def shift_padded(seqs: torch.Tensor, pad_id: int) -> Batch:
    """Causal-LM batch from padded sequences (B, L): inputs seqs[:, :-1], labels seqs[:, 1:].

    loss_mask drops targets read from a pad input (pad -> pad); the first pad after the text stays
    counted, since predicting it is how the model learns where a sequence ends.
    """
    x, y = seqs[:, :-1], seqs[:, 1:]
    return {"input_ids": x, "labels": y, "loss_mask": x != pad_id}


def padded_batches(seqs: torch.Tensor, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """`shift_padded` batches of `seqs` in order, the last one possibly smaller (evaluation)."""
    for i in range(0, len(seqs), batch_size):
        yield shift_padded(seqs[i:i + batch_size], pad_id)


class PaddedSequences(BatchSource):
    """Fixed-length padded sequences, reshuffled every epoch (permutation seeded by seed + epoch).

    State is (epoch, index within the epoch); the permutation is recomputed on resume, so no generator
    state is needed. The last partial batch of an epoch is dropped, as `DataLoader(drop_last=True)`.
    """

    def __init__(self, seqs: torch.Tensor, batch_size: int, pad_id: int, seed: int = 0,
                 val_seqs: torch.Tensor | None = None, shuffle: bool = True):
        if len(seqs) < batch_size:
            raise ValueError(f"{len(seqs)} sequences are fewer than one batch of {batch_size}")
        self.seqs, self.val_seqs = seqs, val_seqs
        self.batch_size, self.pad_id, self.seed, self.shuffle = batch_size, pad_id, seed, shuffle
        self.epoch, self.index = 0, 0
        self._perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass (global batches when sharded)."""
        return len(self.seqs) // self._global

    @property
    def _global(self) -> int:
        return self.batch_size * self.world_size

    def shard(self, rank: int, world_size: int) -> None:
        """Read only rank `rank`'s slice of each global batch."""
        if len(self.seqs) < self.batch_size * world_size:
            raise ValueError(f"{len(self.seqs)} sequences are fewer than one global batch of "
                             f"{self.batch_size} x {world_size} ranks")
        self._set_shard(rank, world_size)

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            n = len(self.seqs)
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        return self._perm

    def next_batch(self) -> Batch:
        """The next batch of this epoch's order; moves to the next epoch when this one is used up."""
        n = self._global
        if self.index + n > len(self.seqs):
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        idx = self._order()[self.index:self.index + n][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.index += n
        if self.index + n > len(self.seqs):  # epoch used up: count it now, not at the next draw
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        return shift_padded(self.seqs[idx], self.pad_id)

    def state_dict(self) -> dict:
        """Epoch and position."""
        return {"kind": "padded_sequences", "epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved epoch and position."""
        self.epoch, self.index, self._perm = int(state["epoch"]), int(state["index"]), None

    def eval_batches(self) -> Iterator[Batch]:
        """All validation sequences, in order."""
        if self.val_seqs is not None:
            yield from padded_batches(self.val_seqs, self.batch_size, self.pad_id)
