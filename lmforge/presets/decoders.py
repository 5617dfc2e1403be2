"""Presets of the dense decoders (teenyGPT, GPT-2, SmolLM2, Llama, Mistral, Falcon, Qwen2) and their tiny test
sizes; each function returns a fresh `Config` and says where its numbers come from.

`gpt2_like` and `llama_like` are the shared builders; `lmforge.presets.families` builds on them too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmforge.config import AttentionConfig, Config, MLPConfig, NormConfig, PositionConfig


def _teenygpt() -> Config:
    # Tomczak, "LLMs" (Deep Generative Modeling blog, post 20) and its teenygpt_example notebook:
    # char vocab 29 (pad, a-z, space, BOS), 150 tokens, D=32, 8 heads, 4 post-LN blocks,
    # MLP width 128 x D = 4096 with GELU, learned positions, dropout 0.1 on the embedding sum,
    # untied output layer, biases everywhere, PyTorch default init. 1,089,181 parameters.
    return Config(
        name="teenygpt", family="lmforge", vocab_size=29, block_size=150, d_model=32, n_layer=4,
        attention=AttentionConfig(n_head=8), mlp=MLPConfig(hidden=128 * 32, activation="gelu"),
        norm=NormConfig(kind="layernorm", placement="post"), position=PositionConfig(kind="learned"),
        tie_embeddings=False, lm_head_bias=True, embed_dropout=0.1, init="torch",
        bos_id=28, pad_id=0,
    )


def gpt2_like(name: str, n_layer: int, d_model: int, n_head: int) -> Config:
    """A GPT-2-shaped config of the given depth, width and heads."""
    # Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", Table 2, and the
    # released checkpoints' config.json: vocab 50257, context 1024, MLP 4d with tanh-GELU, pre-LN with a
    # final LN, learned positions, tied embeddings, biases on. Dropout 0 for pre-training (as nanoGPT).
    return Config(
        name=name, family="gpt2", vocab_size=50257, block_size=1024, d_model=d_model, n_layer=n_layer,
        attention=AttentionConfig(n_head=n_head), mlp=MLPConfig(hidden=4 * d_model, activation="gelu_tanh"),
        norm=NormConfig(kind="layernorm", eps=1e-5), position=PositionConfig(kind="learned"),
        tie_embeddings=True, bos_id=50256, eos_id=50256,
    )


def llama_like(name: str, family: str, *, vocab: int, ctx: int, d: int, layers: int, heads: int,
                kv: int, ffn: int, theta: float, eps: float, tied: bool, window: int | None = None,
                qkv_bias: bool = False, head_dim: int | None = None) -> Config:
    """A Llama-shaped config: RMSNorm, SwiGLU, RoPE, GQA, no biases (Q/K/V bias optional), optional window."""
    return Config(
        name=name, family=family, vocab_size=vocab, block_size=ctx, d_model=d, n_layer=layers,
        attention=AttentionConfig(n_head=heads, n_kv_head=kv, head_dim=head_dim, qkv_bias=qkv_bias,
                                  out_bias=False, sliding_window=window),
        mlp=MLPConfig(hidden=ffn, activation="swiglu", bias=False),
        norm=NormConfig(kind="rmsnorm", eps=eps, bias=False),
        position=PositionConfig(kind="rope", rope_theta=theta), tie_embeddings=tied,
    )


def _smollm2_135m() -> Config:
    # HuggingFaceTB/SmolLM2-135M config.json (Allal et al. 2025, "SmolLM2"): 30 layers, d 576, 9 heads,
    # 3 KV heads, SwiGLU FFN 1536, RoPE theta 1e5, RMSNorm eps 1e-5, vocab 49152, context 8192, tied.
    c = llama_like("smollm2-135m", "llama", vocab=49152, ctx=8192, d=576, layers=30, heads=9, kv=3,
                    ffn=1536, theta=100000.0, eps=1e-5, tied=True)
    c.bos_id, c.eos_id, c.pad_id = 1, 2, 2
    return c


def _llama_110m() -> Config:
    # Karpathy's llama2.c "stories110M": dim 768, 12 layers, 12 heads (MHA), hidden 2048
    # (= 2/3 * 4 * 768 rounded to 32), vocab 32000 (Llama-2 SentencePiece), context 1024, tied.
    # 109.5M parameters.
    c = llama_like("llama-110m", "llama", vocab=32000, ctx=1024, d=768, layers=12, heads=12, kv=12,
                    ffn=2048, theta=10000.0, eps=1e-5, tied=True)
    c.bos_id, c.eos_id = 1, 2
    return c


def _mistral_7b() -> Config:
    # Jiang et al. 2023, "Mistral 7B", Table 1: dim 4096, 32 layers, head_dim 128, hidden 14336,
    # 32 heads, 8 KV heads, sliding window 4096, context 8192 (as released), vocab 32000. Untied.
    c = llama_like("mistral-7b", "mistral", vocab=32000, ctx=8192, d=4096, layers=32, heads=32, kv=8,
                    ffn=14336, theta=10000.0, eps=1e-5, tied=False, window=4096)
    c.bos_id, c.eos_id = 1, 2
    return c


def _falcon_7b() -> Config:
    # Almazrouei et al. 2023, "The Falcon Series of Open Language Models", and tiiuae/falcon-7b
    # config.json: d 4544, 32 layers, 71 heads of 64, multi-query attention (1 KV head), parallel
    # attention + MLP sharing one LayerNorm, GELU MLP 4d, RoPE, no biases, vocab 65024, context 2048.
    return Config(
        name="falcon-7b", family="falcon", vocab_size=65024, block_size=2048, d_model=4544, n_layer=32,
        attention=AttentionConfig(n_head=71, n_kv_head=1, qkv_bias=False, out_bias=False),
        mlp=MLPConfig(hidden=4 * 4544, activation="gelu", bias=False),
        norm=NormConfig(kind="layernorm", eps=1e-5), position=PositionConfig(kind="rope"),
        parallel_residual=True, tie_embeddings=True, bos_id=11, eos_id=11,
    )


def _qwen2_0_5b() -> Config:
    # Qwen/Qwen2-0.5B config.json (Yang et al. 2024, "Qwen2 Technical Report"): d 896, 24 layers,
    # 14 heads, 2 KV heads, SwiGLU 4864, RoPE theta 1e6, RMSNorm 1e-6, vocab 151936, bias on Q/K/V only.
    return llama_like("qwen2-0.5b", "qwen2", vocab=151936, ctx=32768, d=896, layers=24, heads=14, kv=2,
                       ffn=4864, theta=1000000.0, eps=1e-6, tied=True, qkv_bias=True)


def _tiny(family: str) -> Config:
    """A few-thousand-parameter model of each family, for tests: same code paths, tiny shapes."""
    base = {
        "gpt2": gpt2_like("tiny-gpt2", 2, 64, 4),
        "llama": llama_like("tiny-llama", "llama", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=2,
                             ffn=160, theta=10000.0, eps=1e-5, tied=False),
        "mistral": llama_like("tiny-mistral", "mistral", vocab=256, ctx=128, d=64, layers=2, heads=4,
                               kv=2, ffn=160, theta=10000.0, eps=1e-5, tied=False, window=16),
        "qwen2": llama_like("tiny-qwen2", "qwen2", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=2,
                             ffn=160, theta=1000000.0, eps=1e-6, tied=True, qkv_bias=True),
        "falcon": dataclasses.replace(_falcon_7b(), name="tiny-falcon", vocab_size=256, block_size=128,
                                      d_model=64, n_layer=2, attention=AttentionConfig(
                                          n_head=4, n_kv_head=1, qkv_bias=False, out_bias=False),
                                      mlp=MLPConfig(hidden=256, activation="gelu", bias=False),
                                      bos_id=None, eos_id=None),
        "teenygpt": dataclasses.replace(_teenygpt(), name="tiny-teenygpt", n_layer=2,
                                        mlp=MLPConfig(hidden=4 * 32, activation="gelu")),
    }[family]
    if family == "gpt2":
        base = dataclasses.replace(base, vocab_size=256, block_size=128, bos_id=None, eos_id=None)
    return base


DECODER_PRESETS: dict[str, Any] = {
    "teenygpt": _teenygpt,
    "gpt2-124m": lambda: gpt2_like("gpt2-124m", 12, 768, 12),
    "gpt2-medium": lambda: gpt2_like("gpt2-medium", 24, 1024, 16),  # 355M
    "gpt2-large": lambda: gpt2_like("gpt2-large", 36, 1280, 20),  # 774M
    "gpt2-xl": lambda: gpt2_like("gpt2-xl", 48, 1600, 25),  # 1558M
    "smollm2-135m": _smollm2_135m,
    "llama-110m": _llama_110m,
    "mistral-7b": _mistral_7b,
    "falcon-7b": _falcon_7b,
    "qwen2-0.5b": _qwen2_0_5b,
    **{f"tiny-{f}": (lambda f=f: _tiny(f)) for f in ("gpt2", "llama", "mistral", "qwen2", "falcon", "teenygpt")},
}
