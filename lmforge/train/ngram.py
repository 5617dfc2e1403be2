"""Fitting the count-based baselines (`lmforge.models.ngram`) on the same data as the neural models.

The counts come from the train split of the data pipeline (`lmforge.data.prepare`: the same token
stream, documents separated the same way, that a `data.kind: tokens` recipe trains on), so an n-gram
and a transformer of one tokenizer are compared on the same held-out split by `lmforge eval perplexity`.

    llm = fit_ngram("runs/quickstart/model", order=4)            # the quickstart model's BPE tokenizer
    lmforge.evaluate.perplexity(llm, read_texts("shakespeare"))  # the test split, as for any model
    llm.save("runs/ngram-kn4")
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def train_tokens(tokenizer, data: str = "shakespeare", data_dir: str | Path | None = None):
    """The train split's token ids (a 1-D array): from a prepared folder (checked against the tokenizer)
    or prepared now, as `data.kind: tokens` does."""
    from lmforge.data import TokenShard, prepare

    if data_dir is not None:
        shard = TokenShard.open(data_dir, "train")
        shard.check_tokenizer(tokenizer)
        return shard.tokens
    kwargs = {}
    if tokenizer.eos_id is None:  # as the run builder: BOS (or pad) separates documents
        kwargs = {"sep_id": tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id}
        if hasattr(tokenizer, "normalize"):
            kwargs["normalize"] = tokenizer.normalize
    with tempfile.TemporaryDirectory() as tmp:
        prepare(data, tokenizer, Path(tmp) / "data", progress=False, **kwargs)
        return TokenShard.open(Path(tmp) / "data", "train").tokens.copy()


def fit_ngram(tokenizer, data: str = "shakespeare", order: int = 3, method: str = "kneser_ney",
              data_dir: str | Path | None = None, block_size: int = 512):
    """An `LLM` holding an n-gram model counted on `data`'s train split.

    Args:
        tokenizer: a tokenizer, or a folder / tokenizer.json to load one from (e.g. a model folder).
        data: the corpus ("shakespeare", a file or folder: see `lmforge.data.iter_documents`).
        order: n (3: trigrams).
        method: "kneser_ney" (interpolated modified Kneser-Ney) or "backoff" (absolute-discount backoff).
        data_dir: a folder already prepared with this tokenizer (e.g. runs/quickstart/data) instead of `data`.
        block_size: the eval's default window (any window >= order - 1 tokens scores the same).
    """
    from lmforge.llm import LLM
    from lmforge.models.ngram import NGramLM
    from lmforge.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    tokens = train_tokens(tok, data, data_dir)
    ids = {k: getattr(tok, k, None) for k in ("bos_id", "eos_id", "pad_id")}
    model = NGramLM.fit(tokens, tok.vocab_size, order=order, method=method, block_size=block_size,
                        name=f"{method}-{order}gram", **ids)
    return LLM(model, tok, f"ngram:{data}")
