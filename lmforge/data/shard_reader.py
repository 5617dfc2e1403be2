"""Prepared token folders read back: the manifest checked against the files, memory-mapped splits, and
random training windows.

`lmforge.data.shards.prepare` writes the folders (see there for the layout). `sample_batch` draws
windows with a `torch.Generator` only, so a trainer that saves and restores the generator's state
resumes on exactly the same batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.errors import ConfigError, FormatError

FORMAT = "lmforge.tokens/1"
MANIFEST = "manifest.json"


class TokenizerLike(Protocol):
    eos_id: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def encode_batch(self, texts: list[str], add_special_tokens: bool = ...) -> list[list[int]]: ...

    def hash(self) -> str: ...


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared folder, after checking that every split file exists and holds
    exactly the number of tokens the manifest records (FormatError otherwise)."""
    folder = Path(out_dir).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise FormatError(f"{folder} is not a prepared dataset: {MANIFEST} is missing; create it with "
                          f"`lmforge prepare --out {folder}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is corrupt ({e}); prepare the data again with --overwrite") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "splits" not in manifest:
        raise FormatError(f"{path} is not an {FORMAT} manifest; prepare the data again with --overwrite")
    try:
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split, info in manifest["splits"].items():
            f = folder / info["file"]
            if not f.is_file():
                raise FormatError(f"{f} is missing (the manifest lists split {split!r}); prepare the data "
                                  "again with --overwrite")
            expected = int(info["tokens"]) * itemsize
            if f.stat().st_size != expected:
                raise FormatError(f"{f} has {f.stat().st_size} bytes but the manifest says {info['tokens']} "
                                  f"{manifest['dtype']} tokens ({expected} bytes); the file is truncated or "
                                  "from another run - prepare the data again with --overwrite")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{path} is missing or has a bad field ({e!r}); prepare the data again with "
                          "--overwrite") from e
    return manifest


def open_shard(out_dir: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Read-only `np.memmap` of one split's tokens (an empty array for an empty split)."""
    return TokenShard.open(out_dir, split).tokens


@dataclass
class TokenShard:
    """One split of a prepared folder: its tokens (memory-mapped) and the folder's manifest."""

    path: Path
    split: str
    tokens: np.ndarray
    manifest: dict[str, Any]

    @classmethod
    def open(cls, out_dir: str | os.PathLike, split: str = "train") -> TokenShard:
        manifest = read_manifest(out_dir)
        if split not in manifest["splits"]:
            raise ConfigError(f"{out_dir} has no split {split!r}; it has {', '.join(manifest['splits'])}")
        info = manifest["splits"][split]
        path = Path(out_dir).expanduser() / info["file"]
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        tokens = (np.memmap(path, dtype=dtype, mode="r") if info["tokens"] > 0
                  else np.zeros(0, dtype=dtype))
        return cls(path=path, split=split, tokens=tokens, manifest=manifest)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self.manifest["tokenizer_hash"])

    def check_tokenizer(self, tokenizer: TokenizerLike) -> None:
        """ConfigError unless `tokenizer` is the one these tokens were made with."""
        if tokenizer.hash() != self.tokenizer_hash:
            raise ConfigError(f"{self.path.parent} was prepared with another tokenizer (hash "
                              f"{self.tokenizer_hash[:12]}, given {tokenizer.hash()[:12]}); prepare the data "
                              "again with this tokenizer, or train with the tokenizer it was made with")

    def sample_batch(self, batch_size: int, block_size: int, generator: torch.Generator,
                     device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample_batch` over this split."""
        return sample_batch(self.tokens, batch_size, block_size, generator, device)


def sample_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
                 device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `tokens`: x = tokens[i:i+T], y = tokens[i+1:i+T+1], as int64
    tensors (B, T). Start positions come from `generator` alone, so saving and restoring its state
    (`generator.get_state()` / `set_state()`) replays the same batches."""
    n = len(tokens)
    if n < block_size + 1:
        raise ConfigError(f"the split has {n} tokens, too few for block_size {block_size} (needs at least "
                          f"{block_size + 1}); use a smaller block size or more data")
    starts = torch.randint(n - block_size, (batch_size,), generator=generator)
    rows = np.stack([np.asarray(tokens[i:i + block_size + 1]) for i in starts.tolist()])
    batch = torch.from_numpy(rows.astype(np.int64))  # (B, T+1)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    if device is not None and torch.device(device).type != "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    return x, y
