"""The tokenizer stage's command: `lmforge train-tokenizer`."""

from __future__ import annotations

import time
from collections.abc import Iterator


def train_tokenizer(data: list[str], out: str = "runs/tokenizer", vocab_size: int = 4096,
                    min_frequency: int = 2, kind: str = "bpe", sentinels: int = 100) -> int:
    """Train a tokenizer on text files and save it as tokenizer.json + tokenizer_config.json.

    kind bpe: byte-level BPE with the special tokens <|endoftext|> (BOS, EOS and pad), <|im_start|> and
    <|im_end|>, and a ChatML chat template; any text encodes and decodes back exactly.
    kind unigram: T5's SentencePiece-style Unigram model with <pad> </s> <unk> and <extra_id_N> sentinels.
    kind wordpiece: BERT's, with [PAD] [UNK] [CLS] [SEP] [MASK].

    Args:
        data: "shakespeare" (embedded corpus), text files, .jsonl files with a "text" field, or folders.
        out: folder to write the tokenizer to (created if needed).
        vocab_size: largest vocabulary size, special tokens (and for bpe the 256 bytes) included.
        min_frequency: fewest times a pair must occur to be merged (bpe, wordpiece).
        kind: bpe, unigram or wordpiece.
        sentinels: unigram: number of <extra_id_N> tokens for span corruption.
    """
    from lmforge.data.texts import iter_texts
    from lmforge.errors import ConfigError
    from lmforge.tokenizers.train import TRAINABLE_KINDS, train_tokenizer_kind

    if kind not in TRAINABLE_KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(TRAINABLE_KINDS)}, got {kind!r}")

    start = time.perf_counter()
    stats = {"docs": 0, "chars": 0}

    def texts() -> Iterator[str]:
        for t in (doc for item in data for doc in iter_texts(item, split="train")):
            stats["docs"] += 1
            stats["chars"] += len(t)
            yield t

    tok, label = train_tokenizer_kind(kind, texts(), vocab_size, min_frequency, sentinels)
    tok.save(out)
    secs = time.perf_counter() - start
    print(f"trained {label}: vocab {tok.vocab_size} from {stats['docs']} documents "
          f"({stats['chars'] / 1e6:.2f}M chars) in {secs:.1f}s -> {out} (hash {tok.hash()[:12]})")
    return 0
