"""GGUF's tensor layout, shared by reading (gguf.py) and writing (gguf_export.py).

llama.cpp's converter permutes the rows of the Q and K projections of `llama` models so that its
RoPE can rotate adjacent pairs (x0, x1), (x2, x3), ...; our model (like transformers) rotates the
two halves of each head. `unpermute` undoes it on load, `permute` redoes it on export. `qwen2`
files are not permuted (llama.cpp runs them with the half-rotation, "NEOX", RoPE).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.config import Config

ARCHS = ("llama", "qwen2", "gpt2")  # llama covers Llama 1-3, Mistral, SmolLM, TinyLlama
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
# Pre-tokenizer regexes of Llama 3 and Qwen2 (tokenizer.ggml.pre "llama-bpe" and "qwen2").
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py `LlamaModel.permute`): per head, interleave halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute`: llama.cpp's interleaved rows back to the rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_names(cfg: Config) -> dict[str, str | tuple[str, ...]]:
    """Our key -> GGUF tensor name (or the names concatenated into it, in row order)."""
    out: dict[str, str | tuple[str, ...]] = {"tok_emb.weight": "token_embd.weight",
                                             "norm_f.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = "output.weight"
    gpt2 = cfg.family == "gpt2"
    if gpt2:
        out["pos_emb.weight"] = "position_embd.weight"
        out["norm_f.bias"] = "output_norm.bias"
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        out[p + "norm_1.weight"], out[p + "norm_2.weight"] = b + "attn_norm.weight", b + "ffn_norm.weight"
        out[p + "attn.proj.weight"], out[p + "mlp.proj.weight"] = b + "attn_output.weight", b + "ffn_down.weight"
        if gpt2:
            out[p + "attn.qkv.weight"], out[p + "mlp.fc.weight"] = b + "attn_qkv.weight", b + "ffn_up.weight"
            for ours, theirs in (("norm_1", "attn_norm"), ("norm_2", "ffn_norm"), ("attn.qkv", "attn_qkv"),
                                 ("attn.proj", "attn_output"), ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")):
                out[p + ours + ".bias"] = b + theirs + ".bias"
        else:
            out[p + "attn.qkv.weight"] = tuple(b + f"attn_{x}.weight" for x in "qkv")
            out[p + "mlp.fc.weight"] = (b + "ffn_gate.weight", b + "ffn_up.weight")
            if cfg.attention.qkv_bias:
                out[p + "attn.qkv.bias"] = tuple(b + f"attn_{x}.bias" for x in "qkv")
    return out


def permuted_heads(cfg: Config, gguf_name: str) -> int | None:
    """Heads to (un)permute a llama-arch Q or K tensor by, else None."""
    if FAMILY_ARCH.get(cfg.family) != "llama":
        return None
    if ".attn_q." in gguf_name:
        return cfg.n_head
    if ".attn_k." in gguf_name:
        return cfg.n_kv_head
    return None


def fused_rows(cfg: Config, ours: str, rows: int) -> list[int]:
    """Row counts of the GGUF tensors fused into our tensor `ours` (Q/K/V or gate/up)."""
    if ".attn.qkv." in ours and cfg.family != "gpt2":
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    if ".mlp.fc." in ours and cfg.mlp.activation in ("swiglu", "geglu"):
        return [rows // 2, rows // 2]
    return [rows]


def unpermute_index(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation: `w[index]` equals `unpermute(w, n_head)`."""
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(0, 2, 1).reshape(-1)

