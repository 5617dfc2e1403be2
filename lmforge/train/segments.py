"""Segment-recurrent training (Transformer-XL, Dai et al. 2019): consecutive segments of the same streams,
with each layer's memory carried from one segment to the next.

- `StreamSegments` (data kind `stream`): the token array is cut into `batch_size` contiguous streams, one
  per batch row (Transformer-XL's batchify); batch n holds segment n of every stream, so row b of a batch
  continues row b of the one before. `reset` (a 0-d bool in the batch) is True at the first segment of a
  pass over the data.
- `SegmentLM` (objective `segment_lm`): the causal-LM loss, computed through a decode `Cache` the objective
  keeps across batches: the model's memory states (xl_attention, and recurrent states too) carry from one
  segment to the next, detached at each boundary (`Cache.new_segment`). Training and evaluation keep
  separate memories; a batch with `reset` starts a fresh one.

The training memory is checkpointed (`SegmentLM.state_dict`, saved by the trainer as the objective's state),
and the data position with it, so a resumed run continues bit-identically with an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.batches import BatchSource
from lmforge.train.objectives import Batch, CausalLM


def _streams(tokens: np.ndarray, rows: int, seq_len: int) -> np.ndarray:
    """(rows, L) contiguous streams, L - 1 a whole number of segments."""
    per_row = (len(tokens) - 1) // rows
    n_seg = per_row // seq_len
    if n_seg < 1:
        raise ConfigError(f"{len(tokens)} tokens cannot give {rows} streams of one {seq_len}-token segment each; "
                          "lower train.batch_size or train.seq_len, or use more data")
    L = n_seg * seq_len + 1
    return np.stack([np.asarray(tokens[b * per_row:b * per_row + L], dtype=np.int64) for b in range(rows)])


class StreamSegments(BatchSource):
    """Consecutive `seq_len`-token segments of `batch_size` contiguous streams (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, val_tokens: np.ndarray | None = None,
                 eval_batches: int = 8):
        self.streams = _streams(tokens, batch_size, seq_len)
        self.val_tokens, self.batch_size, self.seq_len, self.n_eval = val_tokens, batch_size, seq_len, eval_batches
        self.n_segments = (self.streams.shape[1] - 1) // seq_len
        self.epoch, self.index = 0, 0
        self._reset = True

    def _segment(self, streams: np.ndarray, i: int, reset: bool) -> Batch:
        w = torch.from_numpy(streams[:, i * self.seq_len:(i + 1) * self.seq_len + 1])
        return {"input_ids": w[:, :-1], "labels": w[:, 1:], "reset": torch.tensor(reset)}

    def next_batch(self) -> Batch:
        """Segment `index` of every stream; the streams start over (reset) after the last one."""
        if self.index >= self.n_segments:
            self.epoch, self.index, self._reset = self.epoch + 1, 0, True
        batch = self._segment(self.streams, self.index, self._reset)
        self.index, self._reset = self.index + 1, False
        return batch

    def state_dict(self) -> dict:
        """Pass and segment index, and whether the next batch starts a new memory."""
        return {"kind": "stream_segments", "epoch": self.epoch, "index": self.index, "reset": self._reset}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved segment. The memory is the objective's (restored with it); a checkpoint
        written before it was saved restarts it empty (`reset` absent)."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._reset = bool(state.get("reset", True))

    def eval_batches(self) -> Iterator[Batch]:
        """The first `eval_batches` consecutive segments of the validation streams, memory carried."""
        if self.val_tokens is None or (len(self.val_tokens) - 1) // self.batch_size < self.seq_len:
            return
        streams = _streams(self.val_tokens, self.batch_size, self.seq_len)
        for i in range(min(self.n_eval, (streams.shape[1] - 1) // self.seq_len)):
            yield self._segment(streams, i, i == 0)


class SegmentLM(CausalLM):
    """Next-token cross-entropy with memory carried across consecutive segments (Transformer-XL training).

    Reads the batches of `StreamSegments` (`reset` starts a new memory). Other options as `CausalLM`.
    """

    name = "segment_lm"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._memory: dict[bool, object] = {}  # training / evaluation memories, kept apart
        self._restored: dict[str, torch.Tensor] | None = None  # a checkpoint's memory, until the next batch

    def forward(self, model: nn.Module, batch: Batch, **kwargs):
        """`model(...)` on this segment (logits, or (nll, hit) with `targets`), reading and advancing the
        memory of the previous one."""
        inner = getattr(model, "_orig_mod", model)
        inner = getattr(inner, "module", inner)
        if not hasattr(inner, "new_cache"):
            raise ConfigError("segment_lm needs a decoder model with a decode cache (a DecoderLM)")
        x = batch["input_ids"]
        B, T = x.shape
        mem = self._memory.get(model.training)
        reset = bool(batch.get("reset", torch.tensor(False)))
        if model.training and self._restored is not None:
            saved, self._restored = self._restored, None
            if not reset:
                mem = self._memory[True] = self._rebuild(inner, saved, B)
        if reset or mem is None or mem.key_mask.shape[0] != B or mem.max_len < T:
            mem = self._memory[model.training] = inner.new_cache(B, max_len=T)
            mem.new_segment()  # refuses models with KV-cache attention layers, before any compute
        else:
            mem.new_segment()
        return model(x, cache=mem, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The training memory: every layer's state tensors (detached), and the cache's slot mask, which
        gives its batch size and capacity. Empty before the first batch."""
        mem = self._memory.get(True)
        if mem is None:
            return {}
        out = {"key_mask": mem.key_mask.clone()}
        for i, s in enumerate(mem.layers):
            for name, t in vars(s).items():
                if isinstance(t, torch.Tensor):
                    out[f"layers.{i}.{name}"] = t.detach().contiguous().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Keep a checkpoint's memory until the next training batch rebuilds it on the model."""
        self._memory.clear()
        self._restored = dict(state) if state else None

    @staticmethod
    def _rebuild(inner: nn.Module, saved: dict[str, torch.Tensor], batch_size: int):
        """A cache of the model's layer states holding the saved tensors."""
        B, max_len = saved["key_mask"].shape
        if B != batch_size:
            raise ConfigError(f"the checkpoint's segment memory holds {B} streams but the batches have {batch_size} "
                              f"rows; resume with train.batch_size={B} (or start a new run.dir)")
        mem = inner.new_cache(B, max_len=max_len)
        for key, t in saved.items():
            if key == "key_mask":
                continue
            _, i, name = key.split(".", 2)
            state = mem.layers[int(i)]
            if not isinstance(getattr(state, name, None), torch.Tensor):
                raise ConfigError(f"the checkpoint's segment memory has {key!r}, which layer {i} of this model does "
                                  "not keep; resume it with the model it was trained with")
            setattr(state, name, t)
        return mem


def stream_data(recipe, tok, run_dir: Path, seq_len: int):
    """`data.kind: stream`: the prepared token shards as contiguous streams of consecutive segments."""
    from lmforge.train import distributed
    from lmforge.train.run import RunData, token_data

    if distributed.world_size() > 1:
        raise ConfigError("data.kind: stream (segment recurrence) runs in one process; use train.strategy: single")
    base = token_data(recipe, tok, run_dir, seq_len)  # prepares (or opens) the shards
    t = recipe.train
    windows = base.source
    source = StreamSegments(windows.tokens, t.batch_size, seq_len, val_tokens=windows.val_tokens,
                            eval_batches=t.eval_batches)
    return RunData(source, None, None, {**base.info, "streams": t.batch_size,
                                        "segments_per_stream": source.n_segments})
