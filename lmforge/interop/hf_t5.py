"""Hugging Face layout of T5 (`T5ForConditionalGeneration`): config.json mapping and the key map.

HF keeps separate q/k/v/o projections per attention (`block.N.layer.0.SelfAttention.q`), the
cross-attention as `layer.1.EncDecAttention` and the MLP as `layer.{1,2}.DenseReluDense.wi / wo`
(`wi_0` gate and `wi_1` up when gated); the relative bias sits in block 0 only. Ours fuses q/k/v into
`attn.qkv`, cross k/v into `cross_attn.kv` and gate/up into `mlp.fc`: the map concatenates on import and
splits on export, so a round trip is exact. `hf.py` dispatches here for model_type "t5".
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import AttentionConfig, Config, EmbeddingConfig, MLPConfig, NormConfig, PositionConfig
from lmforge.errors import ConfigError, FormatError

_FF = {"relu": "relu", "gated-gelu": "geglu"}
_FF_BACK = {v: k for k, v in _FF.items()}


def exportable(cfg: Config) -> str | None:
    """Why `cfg` cannot be written as a T5 folder, or None when it can."""
    ok = (cfg.is_encoder_decoder and cfg.position.kind == "relative" and cfg.norm.kind == "rmsnorm"
          and cfg.norm.placement == "pre" and cfg.attention.scale == 1.0 and not cfg.attention.qkv_bias
          and not cfg.attention.out_bias and not cfg.mlp.bias and cfg.mlp.activation in _FF_BACK
          and cfg.n_kv_head == cfg.n_head and cfg.layer_mixers() == [("attention", "mlp")] * cfg.n_layer
          and (cfg.tie_embeddings or not cfg.embedding.tied_head_scale) and not cfg.embedding.scale
          and cfg.attention.sliding_window is None and not cfg.lm_head_bias and cfg.head == "linear")
    return None if ok else "this config differs from T5's (relative bias, RMS norm, no biases, relu/gated-gelu FFN)"


def to_hf_config(cfg: Config) -> dict[str, Any]:
    """config.json contents that `transformers` reads as the same T5."""
    why = exportable(cfg)
    if why:
        raise ConfigError(f"cannot export {cfg.name!r} to a transformers folder: {why}")
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.mlp.hidden,
            "num_layers": cfg.encoder_layers, "num_decoder_layers": cfg.n_layer, "num_heads": cfg.n_head,
            "relative_attention_num_buckets": cfg.position.buckets,
            "relative_attention_max_distance": cfg.position.max_distance, "dropout_rate": cfg.resid_dropout,
            "layer_norm_epsilon": cfg.norm.eps, "initializer_factor": 1.0,
            "feed_forward_proj": _FF_BACK[cfg.mlp.activation], "tie_word_embeddings": cfg.tie_embeddings,
            "scale_decoder_outputs": cfg.tie_embeddings and cfg.embedding.tied_head_scale,
            "n_positions": cfg.block_size, "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id,
            "decoder_start_token_id": cfg.decoder_start_id, "use_cache": True, "torch_dtype": "float32"}


def from_hf_config(d: dict[str, Any], source: str = "config.json") -> Config:
    """Our `Config` for a T5 config.json; a clear error for what it cannot represent."""

    def get(key: str, default: Any = KeyError) -> Any:
        if d.get(key) is not None:
            return d[key]
        if default is KeyError:
            raise FormatError(f"{source}: missing field {key!r} needed for a t5 model")
        return default

    ff = get("feed_forward_proj", "relu")
    if ff not in _FF:
        raise FormatError(f"{source}: feed_forward_proj {ff!r} is not supported; supported: {sorted(_FF)}")
    tied = bool(d.get("tie_word_embeddings", True))
    # transformers 5 always ties T5's head and says in `scale_decoder_outputs` whether it scales (v1: yes,
    # v1.1: no); older configs say both with tie_word_embeddings (v1.1: false, and an lm_head of its own)
    scaled = bool(d.get("scale_decoder_outputs", tied)) and tied
    heads, d_kv, d_model = get("num_heads"), get("d_kv"), get("d_model")
    cfg = Config(
        name=d.get("_name_or_path") or "t5", family="t5", vocab_size=get("vocab_size"),
        block_size=get("n_positions", 512), d_model=d_model, n_layer=get("num_decoder_layers", get("num_layers")),
        encoder_layers=get("num_layers"),
        attention=AttentionConfig(n_head=heads, head_dim=None if heads * d_kv == d_model else d_kv, qkv_bias=False,
                                  out_bias=False, scale=1.0),
        mlp=MLPConfig(hidden=get("d_ff"), activation=_FF[ff], bias=False),
        norm=NormConfig(kind="rmsnorm", eps=get("layer_norm_epsilon", 1e-6), placement="pre", bias=False),
        position=PositionConfig(kind="relative", buckets=get("relative_attention_num_buckets", 32),
                                max_distance=get("relative_attention_max_distance", 128)),
        embedding=EmbeddingConfig(tied_head_scale=scaled), tie_embeddings=tied, init="t5",
        pad_id=get("pad_token_id", 0), eos_id=get("eos_token_id", 1),
        decoder_start_id=get("decoder_start_token_id", get("pad_token_id", 0)),
    )
    return cfg.validate()


def _pairs(cfg: Config) -> list[tuple[str, str]]:
    """(our key, HF key) for tensors that map one to one."""
    out = [("tok_emb.weight", "shared.weight"), ("encoder.rel_bias.weight",
                                                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
           ("decoder.rel_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")]
    for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.n_layer)):
        ff = 1 if stack == "encoder" else 2  # the decoder's MLP comes after its cross-attention
        for i in range(n):
            p, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            out += [(p + "norm_1.weight", h + "0.layer_norm.weight"),
                    (p + "attn.proj.weight", h + "0.SelfAttention.o.weight"),
                    (p + "norm_2.weight", h + f"{ff}.layer_norm.weight"),
                    (p + "mlp.proj.weight", h + f"{ff}.DenseReluDense.wo.weight")]
            if stack == "decoder":
                out += [(p + "norm_cross.weight", h + "1.layer_norm.weight"),
                        (p + "cross_attn.q.weight", h + "1.EncDecAttention.q.weight"),
                        (p + "cross_attn.proj.weight", h + "1.EncDecAttention.o.weight")]
        out.append((f"{stack}.norm_f.weight", f"{stack}.final_layer_norm.weight"))
    return out


def _fused(cfg: Config) -> list[tuple[str, list[str]]]:
    """(our fused key, the HF keys concatenated along the output dimension, in order)."""
    gated = cfg.mlp.activation == "geglu"
    out = []
    for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.n_layer)):
        ff = 1 if stack == "encoder" else 2
        for i in range(n):
            p, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            out.append((p + "attn.qkv.weight", [h + f"0.SelfAttention.{x}.weight" for x in "qkv"]))
            wi = ["wi_0", "wi_1"] if gated else ["wi"]  # gate first, as our gated MLP keeps them
            out.append((p + "mlp.fc.weight", [h + f"{ff}.DenseReluDense.{w}.weight" for w in wi]))
            if stack == "decoder":
                out.append((p + "cross_attn.kv.weight", [h + f"1.EncDecAttention.{x}.weight" for x in "kv"]))
    return out


def to_hf_state_dict(cfg: Config, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF T5 keys (a tied LM head left out, as transformers saves it)."""
    out = {theirs: sd[ours] for ours, theirs in _pairs(cfg)}
    for ours, theirs in _fused(cfg):
        for k, w in zip(theirs, sd[ours].chunk(len(theirs))):
            out[k] = w
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["decoder.lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: Config, hf: dict[str, torch.Tensor], source: str = "weights") -> dict[str, torch.Tensor]:
    """HF T5 keys -> our state dict. Missing tensors raise `FormatError` naming them."""

    def take(key: str) -> torch.Tensor:
        if key in hf:
            return hf[key]
        if key == "shared.weight" and "encoder.embed_tokens.weight" in hf:
            return hf["encoder.embed_tokens.weight"]
        raise FormatError(f"{source}: missing tensor {key!r} for a t5 model")

    sd = {ours: take(theirs) for ours, theirs in _pairs(cfg)}
    for ours, theirs in _fused(cfg):
        sd[ours] = torch.cat([take(k) for k in theirs])
    sd["decoder.lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    return sd
