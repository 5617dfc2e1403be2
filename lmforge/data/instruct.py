"""Fine-tuning data: instruction and preference sets from JSONL, rendered with the model's chat template.

A line of an instruction file is one example, either a conversation or a prompt/response pair:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "response": "...", "system": "..."}          # system optional

A preference line is {"prompt": "...", "chosen": "...", "rejected": "..."} (chosen != rejected).
Malformed lines are reported with their line numbers and skipped; the good lines are kept.

`render` turns a conversation into token ids and a mask that is True on assistant tokens (their
end-of-turn marker included): the loss counts only what the model should learn to say, unless
`prompt_loss`. `InstructionBatches` pads examples into batches or packs several into one row; a packed
row carries `segment_ids`, and the model then attends only within each example and restarts positions
per example, so a packed batch computes what the examples would alone.

Built-in sets (data/shakespeare_instruct/, see its README): `shakespeare-instruct` and `shakespeare-prefs`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.data.corpus import data_root
from lmforge.errors import ConfigError, FormatError
from lmforge.tokenizers.chat import validate_messages

# name -> (folder under data/, file prefix); files are <prefix>{train,val,test}.jsonl
BUILTIN = {"shakespeare-instruct": ("shakespeare_instruct", ""),
           "shakespeare-prefs": ("shakespeare_instruct", "prefs_")}


@dataclass
class BadLine:
    """A line of a JSONL file that was skipped, and why."""

    lineno: int
    reason: str


def _check_row(obj: Any, kind: str) -> str | None:
    """Why `obj` is not a valid row of `kind` (instructions / preferences), or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if kind == "preferences":
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(k), str) or not obj[k].strip():
                return f"{k!r} must be a non-empty string"
        if obj["chosen"].strip() == obj["rejected"].strip():
            return "chosen and rejected are identical (the pair teaches nothing)"
        return None
    if "messages" in obj:
        try:
            msgs = validate_messages(obj["messages"])
        except ConfigError as e:
            return str(e)
        if not any(m["role"] == "assistant" and m.get("content") for m in msgs):
            return "no assistant message with content (nothing to learn)"
        return None
    for k in ("prompt", "response"):
        if not isinstance(obj.get(k), str) or not obj[k].strip():
            return f"needs 'messages', or 'prompt' and 'response' as non-empty strings ({k!r} is missing or empty)"
    if "system" in obj and not isinstance(obj["system"], str):
        return "'system' must be a string"
    return None


def read_jsonl(path: str | Path, kind: str = "instructions", quiet: bool = False) -> tuple[list[dict], list[BadLine]]:
    """(good rows, skipped lines) of an instruction or preference JSONL file.

    Each row gets `_line` (its line number). Skipped lines are reported on stderr with their numbers and
    reasons unless `quiet`. FormatError when the file is missing, not UTF-8 or has no good line at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file; pass a .jsonl file or a built-in set ({', '.join(BUILTIN)})")
    rows, bad = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(BadLine(i, f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        why = _check_row(obj, kind)
        if why:
            bad.append(BadLine(i, why))
        else:
            rows.append({**obj, "_line": i})
    if bad and not quiet:
        shown = "; ".join(f"line {b.lineno}: {b.reason}" for b in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        print(f"warning: {path}: skipped {len(bad)} malformed line(s), kept {len(rows)}: {shown}{more}",
              file=sys.stderr)
    if not rows:
        raise FormatError(f"{path}: no valid {kind} line" + (f" (line {bad[0].lineno}: {bad[0].reason})" if bad
                          else " (the file is empty)") + "; see lmforge.data.instruct for the line format")
    return rows, bad


def to_messages(row: dict) -> list[dict]:
    """A row's conversation: its `messages`, or system/prompt/response as one."""
    if "messages" in row:
        return validate_messages(row["messages"])
    sys_msg = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*sys_msg, {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def builtin_file(name: str, split: str) -> Path:
    """The file of a built-in set's split."""
    folder, prefix = BUILTIN[name]
    path = data_root() / folder / f"{prefix}{split}.jsonl"
    if not path.is_file():
        raise FormatError(f"built-in set {name}: {path} is missing; run from a checkout that has data/{folder}/ "
                          f"(rebuild with python data/{folder}/build.py)")
    return path


def check_source(source: str) -> None:
    """ConfigError unless `source` is a built-in set or an existing .jsonl file."""
    if source in BUILTIN:
        return
    p = Path(source)
    if not p.is_file() or p.suffix.lower() != ".jsonl":
        raise ConfigError(f"data.source {source!r}: not a built-in set ({', '.join(BUILTIN)}) and no such .jsonl "
                          "file")


# ---- rendering ------------------------------------------------------------------------------------

def render(tok, messages: list[dict], prompt_loss: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the tokenizer's chat template, and a loss mask over them.

    The mask is True on each assistant turn's tokens (what the template adds after the generation
    prompt, up to and including its end-of-turn marker); everything else is False, unless `prompt_loss`
    makes it all True. The template is rendered for growing prefixes of the conversation to find where
    each assistant turn starts and ends, so any template that renders prefixes as prefixes works.
    """
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:j], add_generation_prompt=True)) if j else 0
        end = len(tok.apply_chat_template(messages[:j + 1], add_generation_prompt=False))
        if not (start <= end <= len(full)) or not full.startswith(
                tok.apply_chat_template(messages[:j + 1], add_generation_prompt=False)):
            raise FormatError("the chat template does not render a conversation's beginning as the beginning of the "
                              "whole; assistant tokens cannot be located (set data.prompt_loss: true to train on all)")
        cuts.append((start, end))
    ids = tok.encode("", add_special_tokens=True)  # BOS, for tokenizers that add one
    mask = [prompt_loss] * len(ids)
    pos = 0
    for start, end in [*cuts, (len(full), len(full))]:
        for a, b, learn in ((pos, start, prompt_loss), (start, end, True)):
            if b > a:
                piece = tok.encode(full[a:b], add_special_tokens=False)
                ids += piece
                mask += [learn] * len(piece)
        pos = end
    return ids, mask


@dataclass
class Example:
    """One rendered example: token ids and where the loss counts (already cut to the context)."""

    ids: list[int]
    mask: list[bool]
    row: dict


def render_rows(tok, rows: list[dict], max_len: int, prompt_loss: bool = False) -> list[Example]:
    """`render` each row, cut to `max_len` tokens; rows with no learnable token left are dropped."""
    out = []
    for row in rows:
        ids, mask = render(tok, to_messages(row), prompt_loss)
        ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[1:]):
            out.append(Example(ids, mask, row))
    return out


# ---- batches --------------------------------------------------------------------------------------

def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch: input_ids, labels (shifted), loss_mask (the targets' masks)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = torch.tensor(e.mask)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask[:, 1:]}


def pack(examples: list[Example], length: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Rows of `length` + 1 tokens holding consecutive examples (in order, greedily), one dict per row.

    `segment_ids` number the examples in a row (-1 is padding). A target counts only within its own
    example, so the first token of an example is never predicted from the previous one.
    """
    rows, cur_ids, cur_mask, cur_seg = [], [], [], []

    def flush():
        n = len(cur_ids)
        ids = torch.tensor(cur_ids + [pad_id] * (length + 1 - n))
        mask = torch.tensor(cur_mask + [False] * (length + 1 - n))
        seg = torch.tensor(cur_seg + [-1] * (length + 1 - n))
        rows.append({"input_ids": ids[:-1], "labels": ids[1:], "loss_mask": mask[1:] & (seg[1:] == seg[:-1]),
                     "segment_ids": seg[:-1]})

    for e in examples:
        if cur_ids and len(cur_ids) + len(e.ids) > length + 1:
            flush()
            cur_ids, cur_mask, cur_seg = [], [], []
        k = cur_seg[-1] + 1 if cur_seg else 0
        cur_ids += e.ids[:length + 1]
        cur_mask += e.mask[:length + 1]
        cur_seg += [k] * min(len(e.ids), length + 1)
    if cur_ids:
        flush()
    return rows


class InstructionBatches:
    """Training batches of rendered examples, reshuffled every epoch; state (epoch, index) resumes exactly.

    With `pack`, each epoch's shuffled examples are packed into rows of `seq_len` (+1) tokens; otherwise a
    batch is `batch_size` examples padded to the longest. Validation batches are the `val` examples in
    order, unpacked. The last partial batch of an epoch is dropped.
    """

    def __init__(self, train: list[Example], batch_size: int, pad_id: int, seq_len: int, seed: int = 0,
                 val: list[Example] | None = None, pack: bool = False):
        if not train:
            raise ConfigError("no training examples left after rendering (are they longer than train.seq_len?)")
        self.train, self.val = train, val or []
        self.batch_size, self.pad_id, self.seq_len, self.seed, self.packed = batch_size, pad_id, seq_len, seed, pack
        self.epoch, self.index = 0, 0
        self._units: list | None = None
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{len(train)} training examples make no full batch of {batch_size}; lower "
                              "train.batch_size")

    def _epoch_units(self) -> list:
        if self._units is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = [self.train[i] for i in torch.randperm(len(self.train), generator=g).tolist()]
            self._units = pack(order, self.seq_len, self.pad_id) if self.packed else order
        return self._units

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass (packing: of this epoch's rows)."""
        return len(self._epoch_units()) // self.batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch; moves to the next epoch when this one is used up."""
        units = self._epoch_units()
        chunk = units[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        if self.index + self.batch_size > len(units):
            self.epoch, self.index, self._units = self.epoch + 1, 0, None
        if self.packed:
            return {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}
        return collate(chunk, self.pad_id)

    def state_dict(self) -> dict:
        """Epoch and position (the order is recomputed from the seed)."""
        return {"kind": "instructions", "epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved epoch and position."""
        self.epoch, self.index, self._units = int(state["epoch"]), int(state["index"]), None

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The validation examples in order, padded per batch."""
        for i in range(0, len(self.val), self.batch_size):
            yield collate(self.val[i:i + self.batch_size], self.pad_id)


def pad_id_of(tok) -> int:
    """Padding id: the tokenizer's pad, else its EOS, else 0 (padding never counts in the loss)."""
    for i in (getattr(tok, "pad_id", None), getattr(tok, "eos_id", None)):
        if i is not None:
            return i
    return 0


def load_splits(source: str, val_source: str | None = None, val_fraction: float = 0.05, seed: int = 0,
                kind: str = "instructions") -> dict[str, list[dict]]:
    """{"train", "val", "test"} rows: a built-in set's own splits, or one file split by a seeded shuffle."""
    if source in BUILTIN:
        return {s: read_jsonl(builtin_file(source, s), kind)[0] for s in ("train", "val", "test")}
    rows, _ = read_jsonl(source, kind)
    if val_source is not None:
        return {"train": rows, "val": read_jsonl(val_source, kind)[0], "test": []}
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    n_val = int(len(rows) * val_fraction)
    return {"train": [rows[i] for i in sorted(perm[n_val:])], "val": [rows[i] for i in sorted(perm[:n_val])],
            "test": []}
