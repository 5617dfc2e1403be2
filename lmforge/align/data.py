"""Preference pairs (prompt, chosen, rejected): tokenised, checked, batched for the preference objectives.

A record is `{"prompt": str | messages, "chosen": str, "rejected": str}`. With `chat=True` the prompt is
rendered with the tokenizer's chat template (generation prompt included) and each response is closed
with the template's end-of-turn; otherwise prompt and response are plain text joined as they are.

Batches stack all chosen rows, then all rejected rows (`lmforge.align.logps` describes the keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import ConfigError
from lmforge.train.batches import BatchSource
from lmforge.train.objectives import Batch


@dataclass
class Pair:
    """One tokenised preference pair."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def read_jsonl(path: str | Path) -> list[dict]:
    """Preference records of a JSONL file, through the one JSONL reader (`lmforge.data.instruct.read_jsonl`):
    malformed lines are reported with their line numbers and skipped, the good ones kept."""
    from lmforge.data.instruct import read_jsonl as read_rows

    return read_rows(path, "preferences")[0]


def _prompt_text(prompt, tok, chat: bool) -> tuple[str, bool]:
    if isinstance(prompt, list):  # chat messages
        return tok.apply_chat_template(prompt, add_generation_prompt=True), True
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True), True
    return prompt, False


def _end_of_turn(tok) -> list[int]:
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if (i := tok.token_to_id(t)) is not None:
            return [i]
    return [tok.eos_id] if tok.eos_id is not None else []


def tokenize_pairs(records: Iterable[dict], tok, chat: bool = True, max_len: int | None = None,
                   source: str = "preference data") -> list[Pair]:
    """Tokenise records into `Pair`s, rejecting pairs that carry no preference.

    Raises ConfigError naming the record for a missing field, an empty response, or identical chosen and
    rejected responses (the loss has nothing to learn from them). With `max_len`, the prompt loses its
    oldest tokens first, then responses are cut, so that prompt + response fits.
    """
    pairs = []
    eot = None
    for i, rec in enumerate(records):
        where = f"{source}, record {i}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {missing}; each record needs prompt, chosen, rejected")
        chosen, rejected = rec["chosen"], rec["rejected"]
        if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or \
                not rejected.strip():
            raise ConfigError(f"{where}: chosen and rejected must be non-empty strings")
        if chosen.strip() == rejected.strip():
            raise ConfigError(f"{where}: chosen and rejected are identical ({chosen[:40]!r}); a pair without a "
                              "difference carries no preference: fix or drop it")
        text, is_chat = _prompt_text(rec["prompt"], tok, chat)
        p = tok.encode(text, add_special_tokens=not is_chat)
        if eot is None:
            eot = _end_of_turn(tok) if is_chat else ([tok.eos_id] if tok.eos_id is not None else [])
        c = tok.encode(chosen, add_special_tokens=False) + eot
        r = tok.encode(rejected, add_special_tokens=False) + eot
        if max_len is not None:
            longest = max(len(c), len(r))
            keep = max(max_len - longest, min(len(p), max_len // 2))
            p = p[len(p) - keep:] if keep < len(p) else p
            c, r = c[:max_len - len(p)], r[:max_len - len(p)]
            if c == r:
                raise ConfigError(f"{where}: chosen and rejected are identical within {max_len} tokens; raise "
                                  "the sequence length or drop the pair")
        pairs.append(Pair(p, c, r))
    if not pairs:
        raise ConfigError(f"{source}: no preference pairs")
    return pairs


def collate(pairs: list[Pair], pad_id: int) -> Batch:
    """A batch of 2B right-padded rows: chosen then rejected (keys in `lmforge.align.logps`)."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    resp = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    return response_batch(rows, resp, pad_id)


def response_batch(rows: list[list[int]], response_lengths: list[int], pad_id: int) -> Batch:
    """Right-padded causal-LM batch of whole sequences whose last `response_lengths[i]` tokens are counted."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, :len(r)] = 1
    # target t (= token t+1) is a response token when t+1 >= len(row) - len(response)
    pos = torch.arange(1, T + 1).unsqueeze(0)
    lens = attn.sum(1, keepdim=True)
    start = lens - torch.tensor(response_lengths).unsqueeze(1)
    mask = (pos >= start) & (pos < lens)
    return {"input_ids": ids[:, :-1] if T > 1 else ids, "labels": ids[:, 1:], "loss_mask": mask[:, :-1],
            "attention_mask": attn[:, :-1], "lengths": lens.squeeze(1)}


class PreferencePairs(BatchSource):
    """Preference pairs in shuffled order, reshuffled every epoch (seed + epoch), last partial batch dropped."""

    def __init__(self, pairs: list[Pair], batch_size: int, pad_id: int, seed: int = 0,
                 val_pairs: list[Pair] | None = None):
        if len(pairs) < batch_size:
            raise ConfigError(f"{len(pairs)} preference pairs are fewer than one batch of {batch_size}")
        self.pairs, self.val_pairs = pairs, val_pairs or []
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.epoch, self.index = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass."""
        return len(self.pairs) // self.batch_size

    def _perm(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.pairs), generator=g).tolist()

    def next_batch(self) -> Batch:
        """The next batch of pairs."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        perm = self._perm()
        take = perm[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return collate([self.pairs[i] for i in take], self.pad_id)

    def state_dict(self) -> dict:
        """Epoch and position within it."""
        return {"kind": "preference_pairs", "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def eval_batches(self) -> Iterator[Batch]:
        """The validation pairs in order."""
        for i in range(0, len(self.val_pairs), self.batch_size):
            yield collate(self.val_pairs[i:i + self.batch_size], self.pad_id)
