"""Sentence embeddings from a bidirectional encoder (all-MiniLM-L6-v2, any BERT), as `LLM.embed` computes them.

Texts are sorted by length and batched, so that a batch holds texts of similar length and little
padding is computed; the output is in the input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from lmforge.errors import NO_TOKENIZER, ConfigError
from lmforge.infer.packed import pack_linears
from lmforge.models.heads import pool
from lmforge.models.ngram import NGramLM
from lmforge.tokenizers.wordpiece import encode_for_encoder


def encoder_tokenizer(model, tokenizer):
    """`tokenizer`, after checking that `model` is a bidirectional encoder and that it has one (ConfigError)."""
    if isinstance(model, NGramLM) or model.config.attention.causal:
        raise ConfigError(f"{model.config.name!r} is a causal decoder; embed() needs a bidirectional encoder "
                          "such as lmforge.load('minilm')")
    if tokenizer is None:
        raise ConfigError(NO_TOKENIZER)
    return tokenizer


def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, pooling: str = "mean",
                normalize: bool = True, max_length: int | None = None, truncate: bool = False,
                progress: bool | None = None) -> np.ndarray:
    """Embeddings (N, d_model) float32 of `texts` from an encoder `model` and its `tokenizer`.

    pooling: "mean" over real tokens or "cls"; normalize: unit L2 norm (cosine = dot product).
    max_length: longest input in tokens (default: the model's context); longer inputs are an error
    unless `truncate`. progress: a progress bar (default: when there are more than 1000 texts).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        return np.zeros((0, model.config.d_model), dtype=np.float32)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    limit = model.config.block_size - model.config.embedding.position_offset
    max_length = min(max_length or limit, limit)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # characters: a cheap proxy for tokens
    out = np.empty((len(texts), model.config.d_model), dtype=np.float32)
    device = next(model.parameters()).device
    if device.type == "cpu":
        pack_linears(model, many_rows=True)  # each text is tens of rows: see `lmforge.infer.packed`
    bar = tqdm(total=len(texts), unit="text", disable=not (progress if progress is not None else len(texts) > 1000))
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            b = encode_for_encoder(tokenizer, [texts[i] for i in idx], max_length=max_length,
                                   truncation=truncate).to(device)
            # a single text has no padding: without a mask the model builds none and pooling averages all rows
            mask = b.attention_mask if len(idx) > 1 else None
            h = model.hidden_states(b.input_ids, attention_mask=mask, token_type_ids=b.token_type_ids)
            e = pool(h.float(), mask, pooling, normalize)
            out[idx] = e.cpu().numpy()
            bar.update(len(idx))
    bar.close()
    return out
