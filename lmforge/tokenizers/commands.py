"""CLI commands of the tokenizer stage (`lmforge train-tokenizer`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import ConfigError, FormatError

TEXT_SUFFIXES = (".txt", ".md")


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{n} is not valid JSON ({e}); fix or remove the line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise FormatError(f"{path}:{n} has no string \"text\" field; each line must be "
                                  '{"text": "..."}')
            yield row["text"]


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_texts(path)
        return
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path} is not UTF-8 text ({e}); convert it or leave it out") from None


def iter_training_texts(data: list[str]) -> Iterator[str]:
    """Documents from text files, .jsonl files (the "text" field of each line) and folders (every
    .txt/.md/.jsonl inside, recursively, in sorted order)."""
    for item in data:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
            if not files:
                raise ConfigError(f"folder {path} has no .txt, .md or .jsonl files to train on")
            for f in files:
                yield from _file_texts(f)
        elif path.is_file():
            yield from _file_texts(path)
        else:
            raise FormatError(f"training data {path} does not exist; pass text files, .jsonl files or folders")


def train_tokenizer(data: list[str], out: str, vocab_size: int = 4096, min_frequency: int = 2) -> int:
    """Train a byte-level BPE tokenizer on text files and save it as tokenizer.json + tokenizer_config.json.

    The tokenizer has the special tokens <|endoftext|> (BOS, EOS and pad), <|im_start|> and <|im_end|>,
    and a ChatML chat template; any text encodes and decodes back exactly.

    Args:
        data: text files, .jsonl files with a "text" field per line, or folders of .txt/.md/.jsonl files.
        out: folder to write the tokenizer to (created if needed).
        vocab_size: largest vocabulary size, special tokens and the 256 bytes included.
        min_frequency: fewest times a pair must occur to be merged.
    """
    from lmforge.tokenizers.bpe import train_bpe

    start = time.perf_counter()
    stats = {"docs": 0, "chars": 0}

    def texts() -> Iterator[str]:
        for t in iter_training_texts(data):
            stats["docs"] += 1
            stats["chars"] += len(t)
            yield t

    tok = train_bpe(texts(), vocab_size=vocab_size, min_frequency=min_frequency)
    tok.save(out)
    secs = time.perf_counter() - start
    print(f"trained byte-level BPE: vocab {tok.vocab_size} from {stats['docs']} documents "
          f"({stats['chars'] / 1e6:.2f}M chars) in {secs:.1f}s -> {out} (hash {tok.hash()[:12]})")
    return 0
