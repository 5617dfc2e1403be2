"""One entry point for training a tokenizer of any trainable kind, shared by `lmforge train-tokenizer` and
the run builder (a recipe's `tokenizer.kind`)."""

from __future__ import annotations

from collections.abc import Iterable

from lmforge.errors import ConfigError

# kind -> (module:function, what the log calls it); imported on use (WordPiece and Unigram are rarely needed)
TRAINABLE_KINDS = {
    "bpe": ("lmforge.tokenizers.bpe:train_bpe", "byte-level BPE"),
    "unigram": ("lmforge.tokenizers.unigram:train_unigram", "Unigram"),
    "wordpiece": ("lmforge.tokenizers.wordpiece:train_wordpiece", "WordPiece"),
}


def train_tokenizer_kind(kind: str, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                         sentinels: int = 100):
    """Train a `kind` tokenizer (bpe | unigram | wordpiece) on `texts`; returns (tokenizer, its kind's name).

    min_frequency applies to bpe and wordpiece, sentinels (<extra_id_N> tokens) to unigram."""
    import importlib

    if kind not in TRAINABLE_KINDS:
        raise ConfigError(f"tokenizer kind must be one of {', '.join(TRAINABLE_KINDS)}, got {kind!r}")
    target, label = TRAINABLE_KINDS[kind]
    module, name = target.split(":")
    train = getattr(importlib.import_module(module), name)
    options = {"sentinels": sentinels} if kind == "unigram" else {"min_frequency": min_frequency}
    return train(texts, vocab_size=vocab_size, **options), label
