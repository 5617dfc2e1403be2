"""CLI commands of the tokenizer stage (`lmforge train-tokenizer`)."""

from __future__ import annotations

import time
from collections.abc import Iterator


def iter_training_texts(data: list[str]) -> Iterator[str]:
    """Documents from each item: "shakespeare" (the embedded corpus' training works), a text file, a .jsonl
    file (the "text" field of each line) or a folder (every .txt/.md/.jsonl inside, in sorted order)."""
    from lmforge.data import iter_documents

    for item in data:
        yield from iter_documents(item, split="train")


def train_tokenizer(data: list[str], out: str = "runs/tokenizer", vocab_size: int = 4096,
                    min_frequency: int = 2) -> int:
    """Train a byte-level BPE tokenizer on text files and save it as tokenizer.json + tokenizer_config.json.

    The tokenizer has the special tokens <|endoftext|> (BOS, EOS and pad), <|im_start|> and <|im_end|>,
    and a ChatML chat template; any text encodes and decodes back exactly.

    Args:
        data: "shakespeare" (embedded corpus), text files, .jsonl files with a "text" field, or folders.
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
