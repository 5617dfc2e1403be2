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
from lmforge.interop import hf_encoders, hf_t5
from lmforge.interop.hf_encoders import ENCODER_FAMILIES

HF_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "mamba")
_ARCH = {"mamba": "MambaForCausalLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
         "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
             "gelu_fast": "gelu_tanh"}


def exportable(cfg: Config) -> str | None:
    """Why `cfg` cannot be written as its family's HF layout, or None when it can."""
    if cfg.bitlinear:
        return "ternary (BitLinear) layers have no transformers layout"
    if cfg.family in ENCODER_FAMILIES:
        return hf_encoders.exportable(cfg)
    if cfg.family == "t5":
        return hf_t5.exportable(cfg)
    if cfg.is_encoder_decoder:
        return "this encoder-decoder has no transformers layout (T5's is supported)"
    if cfg.family not in HF_FAMILIES:
        return f"family {cfg.family!r} has no transformers layout (supported: {', '.join(HF_FAMILIES)})"
    if cfg.parallel_residual or cfg.norm.placement != "pre" or cfg.lm_head_bias:
        return "transformers' layout needs pre-norm, sequential blocks and no LM-head bias"
    if cfg.family == "mamba":
        ok = (cfg.layer_mixers() == [("mamba", "none")] * cfg.n_layer and cfg.norm.kind == "rmsnorm"
              and cfg.position.kind == "none" and cfg.ssm.conv_bias)
        return None if ok else "transformers' Mamba is RMSNorm + Mamba mixer in every layer, no positions"
    block = ("attention", "moe" if cfg.family == "mixtral" else "mlp")
    if cfg.layer_mixers() != [block] * cfg.n_layer:
        return f"transformers' {cfg.family} layout has '{'+'.join(block)}' in every layer"
    m = cfg.moe
    if cfg.family == "mixtral" and (m.n_shared or m.capacity_factor is not None or not m.normalize_topk
                                    or m.hidden not in (None, cfg.mlp.hidden)):
        return "transformers' Mixtral has no shared experts, no capacity limit and renormalised top-k gates"
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
    if cfg.family in ("llama", "mixtral"):
        ok = ok and cfg.attention.sliding_window is None
    if cfg.family == "mixtral":
        ok = ok and not cfg.attention.qkv_bias
    return None if ok else f"this config differs from the {cfg.family} block (positions, norm, MLP or biases)"


def to_hf_config(cfg: Config) -> dict[str, Any]:
    """config.json contents that `transformers` reads as the same architecture."""
    if cfg.family in ENCODER_FAMILIES:
        return hf_encoders.to_hf_config(cfg)
    if cfg.family == "t5":
        return hf_t5.to_hf_config(cfg)
    why = exportable(cfg)
    if why:
        raise ConfigError(f"cannot export {cfg.name!r} to a transformers folder: {why}")
    common = {"architectures": [_ARCH[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
              "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    if cfg.family == "mamba":
        s = cfg.ssm
        return {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "state_size": s.d_state,
                "conv_kernel": s.d_conv, "expand": s.expand, "intermediate_size": s.expand * cfg.d_model,
                "time_step_rank": s.dt_rank or -(-cfg.d_model // 16), "use_bias": s.proj_bias,
                "use_conv_bias": s.conv_bias, "layer_norm_epsilon": cfg.norm.eps, "hidden_act": "silu",
                "residual_in_fp32": True, "initializer_range": cfg.init_std}
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
    elif cfg.family == "mixtral":
        d.update(sliding_window=None, num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                 router_aux_loss_coef=cfg.moe.aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0)
    return d


def from_hf_config(d: dict[str, Any], source: str = "config.json") -> Config:
    """Our `Config` for an HF config.json of a supported family; a clear error otherwise."""
    mt = d.get("model_type")
    if mt in ENCODER_FAMILIES:
        return hf_encoders.from_hf_config(d, source)
    if mt == "t5":
        return hf_t5.from_hf_config(d, source)
    if mt not in HF_FAMILIES:
        raise FormatError(f"{source}: model_type {mt!r} is not supported; supported: "
                          f"{', '.join(HF_FAMILIES + ENCODER_FAMILIES + ('t5',))}")

    def get(*keys, default=KeyError):
        for k in keys:
            if d.get(k) is not None:
                return d[k]
        if default is KeyError:
            raise FormatError(f"{source}: missing field {keys[0]!r} needed for a {mt} model")
        return default

    name = d.get("_name_or_path") or mt
    if mt == "mamba":
        from lmforge.config import SSMConfig
        hidden, expand = get("hidden_size"), get("expand", default=2)
        if get("intermediate_size", default=expand * hidden) != expand * hidden:
            raise FormatError(f"{source}: intermediate_size must be expand * hidden_size")
        if d.get("hidden_act", "silu") != "silu":
            raise FormatError(f"{source}: hidden_act {d.get('hidden_act')!r} is not supported (silu only)")
        cfg = Config(name=name, family="mamba", vocab_size=get("vocab_size"), d_model=hidden,
                     block_size=d.get("max_position_embeddings") or 65536, n_layer=get("num_hidden_layers"),
                     block="mamba+none", attention=AttentionConfig(n_head=1),
                     norm=NormConfig(kind="rmsnorm", eps=get("layer_norm_epsilon", default=1e-5), bias=False),
                     position=PositionConfig(kind="none"), tie_embeddings=d.get("tie_word_embeddings", True),
                     ssm=SSMConfig(d_state=get("state_size", default=16), d_conv=get("conv_kernel", default=4),
                                   expand=expand, dt_rank=get("time_step_rank", default=-(-hidden // 16)),
                                   conv_bias=d.get("use_conv_bias", True), proj_bias=d.get("use_bias", False)))
    elif mt == "gpt2":
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
        if mt == "mixtral":
            from lmforge.config import MoEConfig
            if d.get("sliding_window"):
                cfg.attention.sliding_window = d["sliding_window"]
            cfg.block = "attention+moe"
            cfg.moe = MoEConfig(n_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
                                aux_loss_coef=float(d.get("router_aux_loss_coef", 0.02)))
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
    if cfg.family in ENCODER_FAMILIES:
        return hf_encoders.to_hf_state_dict(cfg, sd)
    if cfg.family == "t5":
        return hf_t5.to_hf_state_dict(cfg, sd)
    out: dict[str, torch.Tensor] = {}
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    if cfg.family == "mamba":  # same tensors, other names
        out = {_MAMBA_OUT(k): v for k, v in sd.items() if k != "lm_head.weight"}
    elif cfg.family == "gpt2":
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
            if cfg.family == "mixtral":  # on disk: one (w1 gate, w3 up, w2 down) triple per expert
                moe = h + "block_sparse_moe."
                out[moe + "gate.weight"] = sd[p + "moe.router.weight"]
                for j, (fc, proj) in enumerate(zip(sd[p + "moe.w_fc"], sd[p + "moe.w_proj"])):
                    out[moe + f"experts.{j}.w1.weight"], out[moe + f"experts.{j}.w3.weight"] = fc.chunk(2)
                    out[moe + f"experts.{j}.w2.weight"] = proj
                continue
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
    if cfg.family in ENCODER_FAMILIES:
        return hf_encoders.from_hf_state_dict(cfg, hf, source)
    if cfg.family == "t5":
        return hf_t5.from_hf_state_dict(cfg, hf, source)

    def take(key: str) -> torch.Tensor:
        for k in (key, key.removeprefix("transformer."), "model." + key if not key.startswith("model.") else key):
            if k in hf:
                return hf[k]
        raise FormatError(f"{source}: missing tensor {key!r}")

    sd: dict[str, torch.Tensor] = {}
    if cfg.family == "mamba":
        names = [f"blocks.{i}.{n}" for i in range(cfg.n_layer) for n in _MAMBA_LAYER
                 if n != "mixer.conv1d.bias" or cfg.ssm.conv_bias]
        names += [f"blocks.{i}.mixer.{p}.bias" for i in range(cfg.n_layer) for p in ("in_proj", "out_proj")
                  if cfg.ssm.proj_bias]
        for k in ["tok_emb.weight", "norm_f.weight", *names]:
            sd[k] = take(_MAMBA_OUT(k))
    elif cfg.family == "gpt2":
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
    elif cfg.family in ("llama", "mistral", "qwen2", "mixtral"):
        sd["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            sd[p + "norm_1.weight"] = take(h + "input_layernorm.weight")
            sd[p + "norm_2.weight"] = take(h + "post_attention_layernorm.weight")
            sd[p + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{x}_proj.weight") for x in "qkv"])
            if cfg.attention.qkv_bias:
                sd[p + "attn.qkv.bias"] = torch.cat([take(h + f"self_attn.{x}_proj.bias") for x in "qkv"])
            sd[p + "attn.proj.weight"] = take(h + "self_attn.o_proj.weight")
            if cfg.family == "mixtral":
                sd.update(_mixtral_experts(cfg, hf, take, p, h))
                continue
            sd[p + "mlp.fc.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
            sd[p + "mlp.proj.weight"] = take(h + "mlp.down_proj.weight")
        sd["norm_f.weight"] = take("model.norm.weight")
    else:
        raise FormatError(f"{source}: family {cfg.family!r} has no transformers key map")
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    return sd


_MAMBA_LAYER = ("norm_1.weight", "mixer.A_log", "mixer.D", "mixer.conv1d.weight", "mixer.conv1d.bias",
                "mixer.in_proj.weight", "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias",
                "mixer.out_proj.weight")


def _MAMBA_OUT(k: str) -> str:
    """Our key -> transformers' MambaForCausalLM key."""
    if k == "tok_emb.weight":
        return "backbone.embeddings.weight"
    if k == "lm_head.weight":
        return k
    return "backbone." + k.replace("blocks.", "layers.").replace("norm_1.", "norm.")


def _mixtral_experts(cfg: Config, hf: dict[str, torch.Tensor], take, p: str, h: str) -> dict[str, torch.Tensor]:
    """One Mixtral layer's router and experts: per-expert w1/w3/w2 (the on-disk layout) or, as
    `transformers` 5 keeps them in memory, `mlp.experts.gate_up_proj` / `down_proj` (already ours)."""
    if any(k.endswith(h + "mlp.experts.gate_up_proj") for k in hf):
        return {p + "moe.router.weight": take(h + "mlp.gate.weight"),
                p + "moe.w_fc": take(h + "mlp.experts.gate_up_proj"),
                p + "moe.w_proj": take(h + "mlp.experts.down_proj")}
    moe = h + "block_sparse_moe."
    E = cfg.moe.n_experts
    fc = [torch.cat([take(moe + f"experts.{j}.w1.weight"), take(moe + f"experts.{j}.w3.weight")]) for j in range(E)]
    return {p + "moe.router.weight": take(moe + "gate.weight"), p + "moe.w_fc": torch.stack(fc),
            p + "moe.w_proj": torch.stack([take(moe + f"experts.{j}.w2.weight") for j in range(E)])}
