"""GGUF, llama.cpp's one-file format: load a .gguf into lmforge (writing one: gguf_export.py).

Reading goes through `gguf_file.GGUFFile` (a fast header parser and vectorised dequantization); llama.cpp's
Q/K row order is undone while the weights are read (gguf_layout.py).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from gguf.constants import TokenType
from torch import nn

from lmforge.config import AttentionConfig, Config, MLPConfig, NormConfig, PositionConfig
from lmforge.errors import ConfigError, FormatError
from lmforge.interop.gguf_export import EXPORT_TYPES, save_gguf  # `lmforge.interop.gguf.save_gguf`, as documented
from lmforge.interop.gguf_file import READ_TYPES, GGUFFile, TensorInfo, dequantize
from lmforge.interop.gguf_layout import (
    ARCHS,
    LLAMA3_REGEX,
    QWEN2_REGEX,
    fused_rows,
    permuted_heads,
    tensor_names,
    unpermute_index,
)
from lmforge.models.build import empty_model

__all__ = ["ARCHS", "EXPORT_TYPES", "READ_TYPES", "GGUFFile", "TensorInfo", "config_from_gguf", "dequantize",
           "load_gguf", "load_weights", "save_gguf", "tokenizer_from_gguf"]

# ---- GGUF metadata -> Config ---------------------------------------------------------------------

def config_from_gguf(f: GGUFFile) -> Config:
    """Our `Config` for a GGUF file's metadata (architectures llama, qwen2, gpt2)."""
    m, src = f.metadata, f.path
    arch = m.get("general.architecture")
    if arch not in ARCHS:
        raise FormatError(f"{src}: architecture {arch!r} is not supported; supported: {', '.join(ARCHS)} "
                          "(llama includes Mistral, SmolLM2, TinyLlama)")
    if "token_embd.weight" not in f.tensors:
        raise FormatError(f"{src}: no token_embd.weight tensor; the file is incomplete")

    def key(name: str, default: Any = KeyError) -> Any:
        v = m.get(f"{arch}.{name}", default)
        if v is KeyError:
            raise FormatError(f"{src}: metadata key {arch}.{name} is missing; the file is incomplete")
        if isinstance(v, list):
            raise FormatError(f"{src}: {arch}.{name} varies per layer, which lmforge does not support")
        return v

    d, heads = key("embedding_length"), key("attention.head_count")
    common = dict(name=str(m.get("general.name") or src.stem), vocab_size=f.tensors["token_embd.weight"].shape[0],
                  block_size=key("context_length"), d_model=d, n_layer=key("block_count"))
    if arch == "gpt2":
        cfg = Config(family="gpt2", **common, attention=AttentionConfig(n_head=heads),
                     mlp=MLPConfig(hidden=key("feed_forward_length"), activation="gelu_tanh"),
                     norm=NormConfig(eps=_f32(key("attention.layer_norm_epsilon", 1e-5))),
                     position=PositionConfig("learned"), tie_embeddings=_tied(f))
    else:
        head_dim = key("attention.key_length", d // heads)
        if key("attention.value_length", head_dim) != head_dim or key("rope.dimension_count", head_dim) != head_dim:
            raise FormatError(f"{src}: value heads or partial RoPE differing from the head size "
                              f"({head_dim}) are not supported")
        if "rope_freqs.weight" in f.tensors:
            raise FormatError(f"{src}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 style) are not "
                              "supported")
        scaling = None
        kind = key("rope.scaling.type", "none")
        if kind == "linear":
            scaling = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif kind != "none":
            raise FormatError(f"{src}: RoPE scaling {kind!r} is not supported (none, linear)")
        window = key("attention.sliding_window", None) if arch == "llama" else None
        family = "qwen2" if arch == "qwen2" else "mistral" if window else "llama"
        qkv_bias = "blk.0.attn_q.bias" in f.tensors
        if arch == "qwen2" and not qkv_bias:
            raise FormatError(f"{src}: a qwen2 model needs Q/K/V biases (blk.N.attn_q.bias); the file has none")
        cfg = Config(family=family, **common,
                     attention=AttentionConfig(n_head=heads, n_kv_head=key("attention.head_count_kv", heads),
                                               head_dim=head_dim if head_dim * heads != d else None,
                                               qkv_bias=qkv_bias, out_bias=False, sliding_window=window),
                     mlp=MLPConfig(hidden=key("feed_forward_length"), activation="swiglu", bias=False),
                     norm=NormConfig(kind="rmsnorm", eps=_f32(key("attention.layer_norm_rms_epsilon")), bias=False),
                     position=PositionConfig(kind="rope", rope_theta=float(key("rope.freq_base", 10000.0)),
                                             rope_scaling=scaling),
                     tie_embeddings=_tied(f))
    cfg.bos_id = m.get("tokenizer.ggml.bos_token_id")
    cfg.eos_id = m.get("tokenizer.ggml.eos_token_id")
    cfg.pad_id = m.get("tokenizer.ggml.padding_token_id")
    try:
        return cfg.validate()
    except ConfigError as e:
        raise FormatError(f"{src}: the metadata describes an invalid model ({e})") from None


def _f32(x: float) -> float:
    # GGUF stores eps as float32: 1e-5 reads back as 9.99999974e-06; give the decimal it was written from
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _tied(f: GGUFFile) -> bool:
    # llama.cpp writes `output.weight` only when it differs from the embedding, except for GPT-2, whose
    # converter writes a copy of it: a byte-identical copy is still a tied head.
    if "output.weight" not in f.tensors:
        return True
    a, b = f.tensors["output.weight"], f.tensors["token_embd.weight"]
    return a.qtype == b.qtype and a.shape == b.shape and np.array_equal(f.raw(a.name), f.raw(b.name))


# ---- tensors ------------------------------------------------------------------------------------

def load_weights(model, f: GGUFFile, skip: frozenset[str] = frozenset()) -> None:
    """Fill `model` (a `DecoderLM` built from `config_from_gguf(f)`) with the file's weights, in place.

    `skip`: our keys filled elsewhere (the quantized layers of a native load, see gguf_quant.py).

    Every tensor's presence, shape and type is checked before anything is read (`FormatError` naming the
    tensor). Each is then dequantized straight into its place in our fused layout, its rows reordered
    while still quantized (a row holds whole blocks), so the weights are written once.
    """
    cfg: Config = model.config
    params = model.state_dict()
    plan = {}
    for ours, theirs in tensor_names(cfg).items():
        if ours in skip:
            continue
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        want = tuple(params[ours].shape)
        for name, rows in zip(names, fused_rows(cfg, ours, want[0])):
            t = f.tensors.get(name)
            if t is None:
                raise FormatError(f"{f.path}: missing tensor {name!r}")
            if t.shape != (rows, *want[1:]):
                raise FormatError(f"{f.path}: tensor {name!r} has shape {t.shape}, the model described by the "
                                  f"metadata needs {(rows, *want[1:])}")
            if t.qtype not in READ_TYPES:
                raise FormatError(f"{f.path}: tensor {name!r} uses quantization type {t.type_name}, which lmforge "
                                  f"does not support; supported: {', '.join(q.name for q in READ_TYPES)}")
        plan[ours] = names

    def fill(ours: str) -> None:
        dst = params[ours]
        direct = dst.dtype == torch.float32 and dst.device.type == "cpu" and dst.is_contiguous()
        out = dst.numpy() if direct else np.empty(tuple(dst.shape), dtype=np.float32)
        r = 0
        for name in plan[ours]:
            t = f.tensors[name]
            n, heads = t.shape[0], permuted_heads(cfg, name)
            if heads and len(t.shape) == 2:
                dequantize(f.rows(name)[unpermute_index(n, heads)], t.qtype, t.shape, out[r:r + n])
            else:
                f.tensor(name, out[r:r + n])
                if heads:  # a 1-D bias
                    out[r:r + n] = out[r:r + n][unpermute_index(n, heads)]
            r += n
        if not direct:
            dst.copy_(torch.from_numpy(out))

    # numpy releases the GIL in its loops: one thread per core (1.0 s -> 0.6 s for SmolLM2 on 2 cores)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(fill, sorted(plan, key=lambda k: -params[k].numel())))


# ---- tokenizer ----------------------------------------------------------------------------------

_GPT2 = dict(pre_tokenizer_regex=None)
_DIGITS = dict(pre_tokenizer_regex=None, individual_digits=True)  # "\p{N}", then GPT-2's regex
# tokenizer.ggml.pre -> how to split text before BPE, as llama.cpp's llama-vocab.cpp does for that name.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    **{k: _GPT2 for k in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion", "phi-2")},
    **{k: _DIGITS for k in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{k: dict(pre_tokenizer_regex=LLAMA3_REGEX, ignore_merges=True)
       for k in ("llama3", "llama-bpe", "llama-v3", "falcon3", "dbrx", "smaug-bpe")},
    **{k: dict(pre_tokenizer_regex=QWEN2_REGEX) for k in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}


def tokenizer_from_gguf(f: GGUFFile):
    """An `HFTokenizer` built from the file's `tokenizer.*` metadata, or None (with a warning) when the
    file has no tokenizer or one lmforge cannot build (only byte-level BPE, "gpt2", is supported)."""
    from lmforge.tokenizers import HFTokenizer

    m = f.metadata
    if "lmforge.tokenizer_json" in m:  # written by save_gguf for tokenizers GGUF's keys cannot express
        import json

        import tokenizers

        from lmforge.tokenizers import CharTokenizer

        tok_json, config = m["lmforge.tokenizer_json"], json.loads(m.get("lmforge.tokenizer_config_json", "{}"))
        if CharTokenizer.matches(json.loads(tok_json)):
            return CharTokenizer(chat_template=config.get("chat_template"))
        return HFTokenizer(tokenizers.Tokenizer.from_str(tok_json), config)
    kind = m.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        warnings.warn(f"{f.path}: tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' is); loading "
                      "the model without a tokenizer: pass tokenizer=<folder> to lmforge.load", stacklevel=3)
        return None
    tokens = m.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or "tokenizer.ggml.merges" not in m:
        raise FormatError(f"{f.path}: a BPE tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    types = m.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    # Control tokens (<|im_start|>) are special; user-defined ones are matched whole, as llama.cpp does.
    specials = [t for t, k in zip(tokens, types) if k in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    # UNUSED entries are placeholders ("[PAD151646]") that pad the list to the embedding's rows
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != TokenType.UNUSED}
    pre = m.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"{f.path}: pre-tokenizer {pre!r} is unknown to lmforge; splitting text as GPT-2 does, "
                      "which may give other ids than llama.cpp", stacklevel=3)

    def name(key: str) -> str | None:
        i = m.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    ctx = m.get(f"{m.get('general.architecture')}.context_length")
    return HFTokenizer.from_bpe(
        vocab, m["tokenizer.ggml.merges"], special_tokens=specials, bos_token=name("bos_token_id"),
        eos_token=name("eos_token_id"), pad_token=name("padding_token_id"), unk_token=name("unknown_token_id"),
        add_bos_token=bool(m.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(m.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=m.get("tokenizer.chat_template"), model_max_length=ctx,
        **PRE_TOKENIZERS.get(pre, _GPT2))


# ---- load ---------------------------------------------------------------------------------------

def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              dequantize: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a .gguf file: config from its metadata, tokenizer from its vocabulary and merges.

    Linears stored as Q8_0, Q4_0 or Q4_1 load into lmforge's quantized layers as they are (on the CPU,
    unless `dequantize`); everything else is dequantized to `dtype` (default float32), which is also the
    dtype the quantized layers compute in. The file is checked before weights are read.
    """
    from lmforge.interop import gguf_quant
    from lmforge.quant.model import restore

    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    tok = tokenizer_from_gguf(f)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise FormatError(f"{f.path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                          f"{cfg.vocab_size} embeddings")
    model = empty_model(cfg, dtype or torch.float32, device)
    names = tensor_names(cfg)
    plan = {} if dequantize or torch.device(device).type != "cpu" else \
        gguf_quant.native_plan(cfg, f, names, permuted_heads)
    skip = {k for k, v in names.items() if (v if isinstance(v, tuple) else (v,)) in [p for p, _ in plan.values()]}
    if plan:
        restore(model, {"method": "gguf", "layers": gguf_quant.layer_infos(plan)})
    with torch.no_grad():
        load_weights(model, f, frozenset(skip))
        gguf_quant.fill(model, f, plan, permuted_heads, unpermute_index)
    return model, tok
