"""Sentence embeddings from a bidirectional encoder (all-MiniLM-L6-v2, any BERT): Python and `lmforge embed`.

Texts are sorted by length and batched, so that a batch holds texts of similar length and little
padding is computed; the output is in the input order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from lmforge.errors import ConfigError, FormatError
from lmforge.infer.packed import pack_linears
from lmforge.loading import NO_TOKENIZER, load_model
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


def embed(texts: list[str] | None = None, model: str = "minilm", file: str | None = None,
          out: str = "embeddings.npy", batch_size: int = 32, pooling: Literal["mean", "cls"] = "mean",
          normalize: bool = True, truncate: bool = False, dtype: Literal["float32", "bfloat16"] = "float32") -> str:
    """Embed sentences with an encoder model and write them as .npy or JSONL.

    Args:
        texts: sentences to embed (--texts "first" "second"), or use --file.
        model: model folder or short name (default: minilm, all-MiniLM-L6-v2).
        file: a text file with one sentence per line, or a .jsonl file with a "text" field per line.
        out: output path: .npy (an N x d float32 array) or .jsonl ({"text", "embedding"} per line).
        batch_size: sentences per forward pass.
        pooling: mean over tokens, or the first ([CLS]) token.
        normalize: scale each embedding to unit length.
        truncate: cut inputs longer than the model's context instead of stopping with an error.
        dtype: the weights' precision. bfloat16 is about 2x faster on CPUs with AMX (all-MiniLM-L6-v2 at batch
            1, Xeon, bench/encode.py) and stays within ~3e-3 of float32 (cosine >= 0.9999); output is float32.
    """
    path = Path(out)
    if path.suffix not in (".npy", ".jsonl"):
        raise ConfigError(f"--out must end in .npy or .jsonl, got {out!r}")
    items = list(texts or [])
    if file:
        items += _read_texts(Path(file))
    if not items:
        raise ConfigError("nothing to embed: give sentences with --texts or a file with --file")
    encoder, tok, _ = load_model(model, dtype=dtype)
    vecs = embed_texts(encoder, encoder_tokenizer(encoder, tok), items, batch_size=batch_size, pooling=pooling,
                       normalize=normalize, truncate=truncate, progress=len(items) > 100)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, vecs)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for t, v in zip(items, vecs):
                f.write(json.dumps({"text": t, "embedding": [float(x) for x in v]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"wrote {len(items)} embeddings of size {vecs.shape[1]} to {path}")
    return str(path)


def _read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise FormatError(f"{path}: no such file; pass a text file with one sentence per line")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    out = []
    for n, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{n}: not valid JSON ({e}); fix the line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise FormatError(f"{path}:{n}: expected an object with a \"text\" string")
        out.append(obj["text"])
    return out
