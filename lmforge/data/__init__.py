"""Data: embedded corpora, document streams, tokenized shards on disk and batch sampling.

    from lmforge.data import iter_documents, prepare, TokenShard
    prepare("shakespeare", tok, "out/data/shakespeare")          # train.bin / val.bin / test.bin
    train = TokenShard.open("out/data/shakespeare", "train")
    x, y = train.sample_batch(8, 256, torch.Generator().manual_seed(0))
"""

from lmforge.data.corpus import (
    TEST_WORKS,
    VAL_WORKS,
    char_passages,
    corpus_stats,
    corpus_works,
    iter_documents,
    normalize_chars,
    read_work,
)
from lmforge.data.shard_reader import TokenShard, open_shard, read_manifest, sample_batch
from lmforge.data.shards import prepare

__all__ = [
    "TEST_WORKS",
    "VAL_WORKS",
    "TokenShard",
    "char_passages",
    "corpus_stats",
    "corpus_works",
    "iter_documents",
    "normalize_chars",
    "open_shard",
    "prepare",
    "read_manifest",
    "read_work",
    "sample_batch",
]
