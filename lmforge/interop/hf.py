"""Hugging Face `transformers` layouts: config.json mapping and one weight-key map per family.

Our model keeps Q/K/V in one `attn.qkv` and gate/up in one `mlp.fc`; HF GPT-2 keeps a fused `c_attn`
stored as Conv1D (transposed), HF Llama/Mistral/Qwen2 keep separate projections. The maps below
concatenate on import and split on export, so a round trip is exact.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import AttentionConfig, Config, MLPConfig, NormConfig, PositionConfig
from lmforge.errors import ConfigError, FormatError

HF_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
_ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM"}
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
             "gelu_fast": "gelu_tanh"}


def exportable(cfg: Config) -> str | None:
    """Why `cfg` cannot be written as its family's HF layout, or None when it can."""
    if cfg.bitlinear:
        return "ternary (BitLinear) layers have no transformers layout"
    if cfg.family not in HF_FAMILIES:
        return f"family {cfg.family!r} has no transformers layout (supported: {', '.join(HF_FAMILIES)})"
    if cfg.parallel_residual or cfg.norm.placement != "pre" or cfg.lm_head_bias:
        return "transformers' layout needs pre-norm, sequential blocks and no LM-head bias"
    if cfg.family == "gpt2":
        ok = (cfg.position.kind == "learned" and cfg.norm.kind == "layernorm" and cfg.norm.bias
              and cfg.n_kv_head == cfg.n_head and cfg.attention.qkv_bias and cfg.attention.out_bias
              and cfg.mlp.bias and cfg.mlp.activation in ("gelu_tanh", "gelu", "relu")
              and cfg.head_dim * cfg.n_head == cfg.d_model and cfg.attention.sliding_window is None)
        return None if ok else "this config differs from GPT-2's block (positions, norms, biases or MLP)"
    ok = (cfg.position.kind == "rope" and cfg.norm.kind == "rmsnorm" and cfg.mlp.activation == "swiglu"
          and not cfg.mlp.bias and not cfg.attention.out_bias)
    if cfg.family in ("llama", "mistral"):
        ok = ok and (cfg.attention.qkv_bias is False or cfg.family == "llama")
    if cfg.family == "qwen2":
        ok = ok and cfg.attention.qkv_bias
    if cfg.family == "llama":
        ok = ok and cfg.attention.sliding_window is None
    return None if ok else f"this config differs from the {cfg.family} block (positions, norm, MLP or biases)"


def to_hf_config(cfg: Config) -> dict[str, Any]:
    """config.json contents that `transformers` reads as the same architecture."""
    why = exportable(cfg)
    if why:
        raise ConfigError(f"cannot export {cfg.name!r} to a transformers folder: {why}")
    common = {"architectures": [_ARCH[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
              "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    if cfg.family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.mlp.activation]
        return {**common, "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.mlp.hidden,
                "activation_function": act, "layer_norm_epsilon": cfg.norm.eps,
                "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embed_dropout,
                "attn_pdrop": cfg.attention.dropout}
    d = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp.hidden,
         "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
         "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm.eps,
         "rope_theta": cfg.position.rope_theta, "rope_scaling": cfg.position.rope_scaling,
         "hidden_act": "silu", "attention_dropout": cfg.attention.dropout, "initializer_range": cfg.init_std}
    if cfg.family == "llama":
        d.update(attention_bias=cfg.attention.qkv_bias, mlp_bias=False)
    elif cfg.family == "mistral":
        d.update(sliding_window=cfg.attention.sliding_window)
    elif cfg.family == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None)
    return d


def from_hf_config(d: dict[str, Any], source: str = "config.json") -> Config:
    """Our `Config` for an HF config.json of a supported family; a clear error otherwise."""
    mt = d.get("model_type")
    if mt not in HF_FAMILIES:
        raise FormatError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(HF_FAMILIES)}")

    def get(*keys, default=KeyError):
        for k in keys:
            if d.get(k) is not None:
                return d[k]
        if default is KeyError:
            raise FormatError(f"{source}: missing field {keys[0]!r} needed for a {mt} model")
        return default

    name = d.get("_name_or_path") or mt
    if mt == "gpt2":
        n_embd = get("n_embd")
        act = get("activation_function", default="gelu_new")
        if act not in _GPT2_ACT:
            raise FormatError(f"{source}: activation_function {act!r} is not supported")
        cfg = Config(
            name=name, family="gpt2", vocab_size=get("vocab_size"), block_size=get("n_positions", "n_ctx"),
            d_model=n_embd, n_layer=get("n_layer"), attention=AttentionConfig(n_head=get("n_head")),
            mlp=MLPConfig(hidden=get("n_inner", default=4 * n_embd), activation=_GPT2_ACT[act]),
            norm=NormConfig(eps=get("layer_norm_epsilon", default=1e-5)), position=PositionConfig("learned"),
            tie_embeddings=d.get("tie_word_embeddings", True),
        )
    else:
        rope = d.get("rope_parameters") or {}
        theta = get("rope_theta", default=rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling and (scaling.get("type") or scaling.get("rope_type")) in (None, "default"):
            scaling = None
        heads = get("num_attention_heads")
        window = None
        if mt == "mistral" or (mt == "qwen2" and d.get("use_sliding_window")):
            window = d.get("sliding_window")
        if d.get("hidden_act", "silu") != "silu":
            raise FormatError(f"{source}: hidden_act {d.get('hidden_act')!r} is not supported (silu only)")
        cfg = Config(
            name=name, family=mt, vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"),
            d_model=get("hidden_size"), n_layer=get("num_hidden_layers"),
            attention=AttentionConfig(n_head=heads, n_kv_head=get("num_key_value_heads", default=heads),
                                      head_dim=d.get("head_dim"), out_bias=False, sliding_window=window,
                                      qkv_bias=True if mt == "qwen2" else bool(d.get("attention_bias", False))),
            mlp=MLPConfig(hidden=get("intermediate_size"), activation="swiglu", bias=False),
            norm=NormConfig(kind="rmsnorm", eps=get("rms_norm_eps", default=1e-6), bias=False),
            position=PositionConfig(kind="rope", rope_theta=float(theta), rope_scaling=scaling),
            tie_embeddings=d.get("tie_word_embeddings", mt == "qwen2"),
        )
        if mt == "llama" and d.get("mlp_bias"):
            raise FormatError(f"{source}: mlp_bias=true is not supported")
    for attr, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        v = d.get(key)
        setattr(cfg, attr, v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None))
    if cfg.attention.head_dim is not None and cfg.attention.head_dim * cfg.n_head == cfg.d_model:
        cfg.attention.head_dim = None  # the default; keeps configs comparable
    if cfg.attention.head_dim is None and cfg.d_model % cfg.n_head:
        raise FormatError(f"{source}: hidden_size is not divisible by num_attention_heads")
    return cfg.validate()


# ---- weights ------------------------------------------------------------------------------------

def to_hf_state_dict(cfg: Config, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF keys and layouts (tied heads left out, as transformers saves them)."""
    out: dict[str, torch.Tensor] = {}
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    if cfg.family == "gpt2":
        out["transformer.wte.weight"] = sd["tok_emb.weight"]
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[h + theirs + ".weight"] = sd[p + ours + ".weight"]
                out[h + theirs + ".bias"] = sd[p + ours + ".bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[h + theirs + ".weight"] = sd[p + ours + ".weight"].t().contiguous()  # Conv1D: (in, out)
                out[h + theirs + ".bias"] = sd[p + ours + ".bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm_f.weight"], sd["norm_f.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = sd[p + "norm_1.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[p + "norm_2.weight"]
            q, k, v = sd[p + "attn.qkv.weight"].split([nh * hs, nkv * hs, nkv * hs])
            out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
            out[h + "self_attn.v_proj.weight"] = v
            if cfg.attention.qkv_bias:
                qb, kb, vb = sd[p + "attn.qkv.bias"].split([nh * hs, nkv * hs, nkv * hs])
                out[h + "self_attn.q_proj.bias"], out[h + "self_attn.k_proj.bias"] = qb, kb
                out[h + "self_attn.v_proj.bias"] = vb
            out[h + "self_attn.o_proj.weight"] = sd[p + "attn.proj.weight"]
            gate, up = sd[p + "mlp.fc.weight"].chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = sd[p + "mlp.proj.weight"]
        out["model.norm.weight"] = sd["norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: Config, hf: dict[str, torch.Tensor], source: str = "weights"
                       ) -> dict[str, torch.Tensor]:
    """HF keys and layouts -> our state dict. Missing keys raise `FormatError` naming them."""

    def take(key: str) -> torch.Tensor:
        for k in (key, key.removeprefix("transformer."), "model." + key if not key.startswith("model.") else key):
            if k in hf:
                return hf[k]
        raise FormatError(f"{source}: missing tensor {key!r}")

    sd: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        sd["tok_emb.weight"] = take("transformer.wte.weight")
        sd["pos_emb.weight"] = take("transformer.wpe.weight")
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                sd[p + ours + ".weight"] = take(h + theirs + ".weight")
                sd[p + ours + ".bias"] = take(h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                sd[p + ours + ".weight"] = take(h + theirs + ".weight").t()
                sd[p + ours + ".bias"] = take(h + theirs + ".bias")
        sd["norm_f.weight"], sd["norm_f.bias"] = take("transformer.ln_f.weight"), take("transformer.ln_f.bias")
    elif cfg.family in ("llama", "mistral", "qwen2"):
        sd["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            sd[p + "norm_1.weight"] = take(h + "input_layernorm.weight")
            sd[p + "norm_2.weight"] = take(h + "post_attention_layernorm.weight")
            sd[p + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{x}_proj.weight") for x in "qkv"])
            if cfg.attention.qkv_bias:
                sd[p + "attn.qkv.bias"] = torch.cat([take(h + f"self_attn.{x}_proj.bias") for x in "qkv"])
            sd[p + "attn.proj.weight"] = take(h + "self_attn.o_proj.weight")
            sd[p + "mlp.fc.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
            sd[p + "mlp.proj.weight"] = take(h + "mlp.down_proj.weight")
        sd["norm_f.weight"] = take("model.norm.weight")
    else:
        raise FormatError(f"{source}: family {cfg.family!r} has no transformers key map")
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    return sd
