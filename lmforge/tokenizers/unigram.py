"""Unigram (SentencePiece-style) tokenizers, T5's kind: train one on text; any such tokenizer.json loads
through `load_tokenizer` as an `HFTokenizer`.

The layout follows T5's tokenizer.json: a Unigram model (Kudo 2018) over pieces that mark a preceding
space with "▁" (the Metaspace pre-tokenizer, so decoding restores spaces), <pad> = 0, </s> = 1 (appended
to every encoded text by the post-processor), <unk> = 2, and the span-corruption sentinels <extra_id_0>
... <extra_id_{N-1}> as the last ids, <extra_id_0> the highest (Raffel et al. 2020, section 3.1.4).
"""

from __future__ import annotations

from collections.abc import Iterable

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import ConfigError
from lmforge.tokenizers.hf import HFTokenizer

T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def sentinel(i: int) -> str:
    """The i-th span-corruption sentinel token, `<extra_id_i>`."""
    return f"<extra_id_{i}>"


def sentinel_ids(tok, n: int | None = None) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... (the first `n`, or all the tokenizer has), in that order."""
    out = []
    while n is None or len(out) < n:
        i = tok.token_to_id(sentinel(len(out)))
        if i is None:
            break
        out.append(i)
    return out


def train_unigram(texts: Iterable[str], vocab_size: int = 8000, *, sentinels: int = 100,
                  model_max_length: int | None = 512) -> HFTokenizer:
    """Train a T5-style Unigram tokenizer on `texts`.

    `vocab_size` counts everything: <pad> </s> <unk>, the learned pieces and `sentinels` <extra_id_N> tokens.
    Text is NFKC-normalised and runs of spaces collapse to one (as T5's normaliser does).
    """
    if sentinels < 0:
        raise ConfigError(f"sentinels must be >= 0, got {sentinels}")
    pieces = vocab_size - sentinels
    if pieces < len(T5_SPECIAL_TOKENS) + 50:
        raise ConfigError(f"vocab_size {vocab_size} leaves too few pieces beside {sentinels} sentinels; "
                          f"use vocab_size >= {sentinels + 60}")
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=pieces, special_tokens=list(T5_SPECIAL_TOKENS), unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # T5 numbers its sentinels downwards from the top of the vocabulary: <extra_id_0> is the last id
    tok.add_special_tokens([AddedToken(sentinel(i), special=True, normalized=False)
                            for i in reversed(range(sentinels))])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": sentinels, "additional_special_tokens": [sentinel(i) for i in range(sentinels)],
              "model_max_length": model_max_length}
    return HFTokenizer(tok, config)
