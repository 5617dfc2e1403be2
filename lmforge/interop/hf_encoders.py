"""Hugging Face layouts of BERT-style encoders (BERT, RoBERTa): config.json mapping and one key map.

Both families share one block layout (`encoder.layer.N.attention.self.query`, ...); they differ in the
prefix (`bert.` / `roberta.`), the MLM head's module names and RoBERTa's position offset. Our model keeps
Q/K/V in one `attn.qkv`; the map concatenates on import and splits on export, so a round trip is exact.
`hf.py` dispatches here for these families.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import AttentionConfig, Config, EmbeddingConfig, MLPConfig, NormConfig, PositionConfig
from lmforge.errors import ConfigError, FormatError

ENCODER_FAMILIES = ("bert", "roberta")
_ACT = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
_ACT_BACK = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new", "silu": "silu"}
# our LM-head kind -> architecture name; "none" is the bare encoder (with its pooler)
_ARCH = {("bert", "mlm"): "BertForMaskedLM", ("bert", "none"): "BertModel",
         ("roberta", "mlm"): "RobertaForMaskedLM", ("roberta", "none"): "RobertaModel"}


def exportable(cfg: Config) -> str | None:
    """Why `cfg` cannot be written as a BERT/RoBERTa folder, or None when it can."""
    ok = (not cfg.attention.causal and cfg.norm.placement == "post" and cfg.norm.kind == "layernorm"
          and cfg.norm.bias and cfg.position.kind == "learned" and cfg.embedding.norm
          and cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.d_model
          and cfg.attention.qkv_bias and cfg.attention.out_bias and cfg.mlp.bias
          and cfg.mlp.activation in _ACT_BACK and cfg.head in ("mlm", "none") and cfg.tie_embeddings
          and cfg.embedding.type_vocab_size > 0 and cfg.attention.sliding_window is None)
    if ok and cfg.family == "roberta":
        ok = cfg.pad_id is not None and cfg.embedding.position_offset == cfg.pad_id + 1
    elif ok:
        ok = cfg.embedding.position_offset == 0
    return None if ok else f"this config differs from the {cfg.family} encoder (masks, norms, positions, head)"


def to_hf_config(cfg: Config) -> dict[str, Any]:
    """config.json contents that `transformers` reads as the same encoder."""
    why = exportable(cfg)
    if why:
        raise ConfigError(f"cannot export {cfg.name!r} to a transformers folder: {why}")
    d = {"architectures": [_ARCH[cfg.family, cfg.head]], "model_type": cfg.family,
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "intermediate_size": cfg.mlp.hidden,
         "hidden_act": _ACT_BACK[cfg.mlp.activation], "max_position_embeddings": cfg.block_size,
         "type_vocab_size": cfg.embedding.type_vocab_size, "layer_norm_eps": cfg.norm.eps,
         "hidden_dropout_prob": cfg.resid_dropout, "attention_probs_dropout_prob": cfg.attention.dropout,
         "initializer_range": cfg.init_std, "position_embedding_type": "absolute",
         "pad_token_id": cfg.pad_id, "tie_word_embeddings": True, "torch_dtype": "float32"}
    if cfg.bos_id is not None:
        d["bos_token_id"] = cfg.bos_id
    if cfg.eos_id is not None:
        d["eos_token_id"] = cfg.eos_id
    return d


def from_hf_config(d: dict[str, Any], source: str = "config.json") -> Config:
    """Our `Config` for a BERT or RoBERTa config.json; a clear error for what it cannot represent."""
    mt = d["model_type"]

    def get(key: str, default: Any = KeyError) -> Any:
        if d.get(key) is not None:
            return d[key]
        if default is KeyError:
            raise FormatError(f"{source}: missing field {key!r} needed for a {mt} model")
        return default

    if get("position_embedding_type", "absolute") != "absolute":
        raise FormatError(f"{source}: position_embedding_type {d['position_embedding_type']!r} is not supported "
                          "(absolute only)")
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise FormatError(f"{source}: a {mt} decoder / cross-attention model is not supported (encoders only)")
    act = get("hidden_act", "gelu")
    if act not in _ACT:
        raise FormatError(f"{source}: hidden_act {act!r} is not supported; supported: {sorted(_ACT)}")
    archs = d.get("architectures") or []
    head = "mlm" if any(a.endswith("ForMaskedLM") for a in archs) else "none"
    pad = get("pad_token_id", 1 if mt == "roberta" else 0)
    heads = get("num_attention_heads")
    cfg = Config(
        name=d.get("_name_or_path") or mt, family=mt, vocab_size=get("vocab_size"),
        block_size=get("max_position_embeddings"), d_model=get("hidden_size"), n_layer=get("num_hidden_layers"),
        attention=AttentionConfig(n_head=heads, causal=False, dropout=get("attention_probs_dropout_prob", 0.0)),
        mlp=MLPConfig(hidden=get("intermediate_size"), activation=_ACT[act]),
        norm=NormConfig(kind="layernorm", eps=get("layer_norm_eps", 1e-12), placement="post"),
        position=PositionConfig(kind="learned"),
        embedding=EmbeddingConfig(type_vocab_size=get("type_vocab_size", 2), norm=True,
                                  position_offset=pad + 1 if mt == "roberta" else 0),
        head=head, pooler=head == "none", tie_embeddings=True, resid_dropout=get("hidden_dropout_prob", 0.0),
        embed_dropout=get("hidden_dropout_prob", 0.0), init_std=get("initializer_range", 0.02), pad_id=pad,
    )
    for attr, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        v = d.get(key)
        setattr(cfg, attr, v if isinstance(v, int) else None)
    if cfg.d_model % heads:
        raise FormatError(f"{source}: hidden_size is not divisible by num_attention_heads")
    return cfg.validate()


def _pairs(cfg: Config) -> list[tuple[str, str]]:
    """(our key, HF key without the family prefix) for everything but Q/K/V and the MLM head."""
    out = [("tok_emb.weight", "embeddings.word_embeddings.weight"),
           ("pos_emb.weight", "embeddings.position_embeddings.weight"),
           ("type_emb.weight", "embeddings.token_type_embeddings.weight"),
           ("emb_norm.weight", "embeddings.LayerNorm.weight"), ("emb_norm.bias", "embeddings.LayerNorm.bias")]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("norm_1", "attention.output.LayerNorm"),
                             ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"),
                             ("norm_2", "output.LayerNorm")):
            out += [(p + ours + ".weight", h + theirs + ".weight"), (p + ours + ".bias", h + theirs + ".bias")]
    if cfg.pooler:
        out += [("pooler.dense.weight", "pooler.dense.weight"), ("pooler.dense.bias", "pooler.dense.bias")]
    return out


def _head_pairs(cfg: Config) -> list[tuple[str, str]]:
    """(our key, HF key) of the MLM head, the bias included (HF ties decoder.bias to it)."""
    if cfg.family == "bert":
        h = "cls.predictions."
        names = (("dense", "transform.dense"), ("norm", "transform.LayerNorm"))
        bias = h + "bias"
    else:
        h = "lm_head."
        names = (("dense", "dense"), ("norm", "layer_norm"))
        bias = h + "bias"
    out = []
    for ours, theirs in names:
        out += [(f"lm_head.{ours}.weight", h + theirs + ".weight"), (f"lm_head.{ours}.bias", h + theirs + ".bias")]
    return out + [("lm_head.decoder.bias", bias)]


def to_hf_state_dict(cfg: Config, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF keys (prefix `bert.`/`roberta.` under a masked-LM head, none for a bare model)."""
    prefix = f"{cfg.family}." if cfg.head == "mlm" else ""
    out = {prefix + theirs: sd[ours] for ours, theirs in _pairs(cfg)}
    d = cfg.d_model
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.attn.qkv.", f"{prefix}encoder.layer.{i}.attention.self."
        for x, w, b in zip(("query", "key", "value"), sd[p + "weight"].split(d), sd[p + "bias"].split(d)):
            out[h + x + ".weight"], out[h + x + ".bias"] = w, b
    if cfg.head == "mlm":
        out.update({theirs: sd[ours] for ours, theirs in _head_pairs(cfg)})
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: Config, hf: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """HF keys -> our state dict, with or without the family prefix. Missing keys raise `FormatError`."""
    prefixes = (f"{cfg.family}.", "")

    def take(key: str, prefixed: bool = True) -> torch.Tensor:
        for p in prefixes if prefixed else ("",):
            if p + key in hf:
                return hf[p + key]
        raise FormatError(f"{source}: missing tensor {key!r} for a {cfg.family} model")

    sd = {ours: take(theirs) for ours, theirs in _pairs(cfg)}
    for i in range(cfg.n_layer):
        h = f"encoder.layer.{i}.attention.self."
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(h + x + ".weight") for x in ("query", "key", "value")])
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(h + x + ".bias") for x in ("query", "key", "value")])
    if cfg.head == "mlm":
        sd.update({ours: take(theirs, prefixed=False) for ours, theirs in _head_pairs(cfg)})
        sd["lm_head.decoder.weight"] = sd["tok_emb.weight"]
    return sd
