"""Presets for the block families beyond dense attention: mixture of experts, state-space models (S4D, Mamba),
linear attention, RetNet, RWKV, LSTM, LSH attention, Transformer-XL and a Jamba-style hybrid, each citing
where its numbers come from.

They are ordinary `Config`s that pick their token and channel mixers with `block` / `layers`; `lmforge.presets`
merges this table into `PRESETS`.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import (
    AttentionConfig,
    Config,
    LSHConfig,
    MLPConfig,
    MoEConfig,
    NormConfig,
    PositionConfig,
    SSMConfig,
    XLConfig,
)
from lmforge.presets.decoders import gpt2_like, llama_like


def _mixtral_8x7b() -> Config:
    # Jiang et al. 2024, "Mixtral of Experts", Table 1, and mistralai/Mixtral-8x7B-v0.1 config.json:
    # dim 4096, 32 layers, 32 heads (8 KV), head_dim 128, 8 experts of SwiGLU width 14336, top-2,
    # context 32768, RoPE theta 1e6, vocab 32000, untied. 46.7B parameters, 12.9B active per token.
    c = llama_like("mixtral-8x7b", "mixtral", vocab=32000, ctx=32768, d=4096, layers=32, heads=32, kv=8,
                    ffn=14336, theta=1e6, eps=1e-5, tied=False)
    c.block, c.moe = "attention+moe", MoEConfig(n_experts=8, top_k=2, aux_loss_coef=0.02)
    c.bos_id, c.eos_id = 1, 2
    return c


def _tiny_moe() -> Config:
    # Mixtral's block at test size: 4 experts of width 64, top-2, no capacity limit (so cached decoding
    # equals the full pass; dropping is tested by setting moe.capacity_factor).
    c = llama_like("tiny-moe", "mixtral", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=2, ffn=64,
                    theta=1e6, eps=1e-5, tied=False)
    c.block, c.moe = "attention+moe", MoEConfig(n_experts=4, top_k=2)
    return c


def _mamba(name: str, d: int, layers: int, vocab: int, ctx: int) -> Config:
    # Gu & Dao 2023, "Mamba", and state-spaces/mamba-130m-hf config.json: blocks are RMSNorm -> mixer ->
    # residual with no MLP, d_state 16, conv 4, expand 2, dt_rank ceil(d/16), no positions, tied head.
    return Config(name=name, family="mamba", vocab_size=vocab, block_size=ctx, d_model=d, n_layer=layers,
                  block="mamba+none", norm=NormConfig(kind="rmsnorm", eps=1e-5, bias=False),
                  position=PositionConfig(kind="none"), tie_embeddings=True, attention=AttentionConfig(n_head=1),
                  mlp=MLPConfig(hidden=4 * d, activation="silu", bias=False))


def _tiny_linear() -> Config:
    # Katharopoulos et al. 2020: a pre-norm transformer with linear attention (elu + 1 features), no positions.
    c = llama_like("tiny-linear", "lmforge", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=4, ffn=160,
                    theta=1e4, eps=1e-5, tied=False)
    c.block, c.position = "linear_attention+mlp", PositionConfig(kind="none")
    return c


def _tiny_retnet() -> Config:
    # Sun et al. 2023, "Retentive Network": pre-LN blocks of multi-scale retention + FFN, rotary-style
    # relative positions on q/k, no biases. Test size.
    c = llama_like("tiny-retnet", "lmforge", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=4, ffn=128,
                    theta=1e4, eps=1e-5, tied=False)
    c.block = "retention+mlp"
    return c


def _tiny_rwkv() -> Config:
    # Peng et al. 2023, RWKV-4: pre-LN blocks of time-mix + channel-mix (hidden 4d), no positions.
    # (RWKV-4 also has a LayerNorm after the embedding; it is left out here.)
    c = gpt2_like("tiny-rwkv", 2, 64, 4)
    c.vocab_size, c.block_size, c.bos_id, c.eos_id = 256, 128, None, None
    c.block, c.position, c.tie_embeddings = "rwkv+rwkv", PositionConfig(kind="none"), False
    c.mlp = MLPConfig(hidden=256, activation="relu", bias=False)
    return c


def _tiny_lstm() -> Config:
    # The classical recurrent LM (Zaremba et al. 2014: embedding, stacked LSTM layers, softmax), as
    # pre-LN residual blocks of an LSTM token mixer and no channel mixer; no positions (the recurrence
    # carries order). Test size.
    c = gpt2_like("tiny-lstm", 2, 64, 4)
    c.vocab_size, c.block_size, c.bos_id, c.eos_id = 256, 128, None, None
    c.block, c.position, c.tie_embeddings = "lstm+none", PositionConfig(kind="none"), False
    return c


def _tiny_s4d() -> Config:
    # Gu et al. 2022 (S4D): pre-norm blocks of S4D (64 states per channel in the paper; 16 here) + MLP.
    c = llama_like("tiny-s4d", "lmforge", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=4, ffn=160,
                    theta=1e4, eps=1e-5, tied=False)
    c.block, c.position, c.ssm = "s4d+mlp", PositionConfig(kind="none"), SSMConfig(d_state=16)
    return c


def _tiny_lsh() -> Config:
    # Kitaev et al. 2020, "Reformer": shared-QK LSH attention (the paper's enwik8 model uses 4 hash rounds,
    # chunks of 64 and buckets sized to ~chunk); test size: 8 buckets, 2 rounds, chunks of 32. RoPE positions.
    c = llama_like("tiny-lsh", "lmforge", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=4, ffn=160,
                    theta=1e4, eps=1e-5, tied=False)
    c.block, c.lsh = "lsh_attention+mlp", LSHConfig(n_buckets=8, n_hashes=2, chunk_len=32)
    return c


def _tiny_xl() -> Config:
    # Dai et al. 2019, "Transformer-XL": relative positions (sinusoidal R, u/v biases) and a memory of the
    # previous segment's hidden states per layer (their enwik8 base: mem_len = segment length). Test size;
    # memory 64 > the 48-token texts of the generic cached-decoding tests, which compare with the plain pass.
    c = llama_like("tiny-xl", "lmforge", vocab=256, ctx=128, d=64, layers=2, heads=4, kv=4, ffn=160,
                    theta=1e4, eps=1e-5, tied=False)
    c.block, c.position, c.xl = "xl_attention+mlp", PositionConfig(kind="none"), XLConfig(mem_len=64)
    return c


def _tiny_mamba() -> Config:
    c = _mamba("tiny-mamba", 64, 2, 256, 128)
    c.ssm.d_state = 8  # test size: half of Mamba's 16 keeps the scan cheap on 2 cores
    return c


def _tiny_jamba() -> Config:
    # Lieber et al. 2024, "Jamba": Mamba and attention layers interleaved (1 attention per 8 layers at
    # scale), MoE in every other layer's channel mixer, no position encoding (Mamba carries order).
    # Test size: 4 layers, one of them attention.
    c = llama_like("tiny-jamba", "lmforge", vocab=256, ctx=128, d=64, layers=4, heads=4, kv=2, ffn=128,
                    theta=1e4, eps=1e-6, tied=False)
    c.position = PositionConfig(kind="none")
    c.layers = ["mamba+mlp", "mamba+moe", "attention+mlp", "mamba+moe"]
    c.moe = MoEConfig(n_experts=4, top_k=2, hidden=64)
    c.ssm = SSMConfig(d_state=8)
    return c


FAMILY_PRESETS: dict[str, Any] = {
    "mixtral-8x7b": _mixtral_8x7b,
    "tiny-moe": _tiny_moe,
    "mamba-130m": lambda: _mamba("mamba-130m", 768, 24, 50280, 2048),
    "tiny-jamba": _tiny_jamba,
    "tiny-linear": _tiny_linear,
    "tiny-retnet": _tiny_retnet,
    "tiny-rwkv": _tiny_rwkv,
    "tiny-lstm": _tiny_lstm,
    "tiny-s4d": _tiny_s4d,
    "tiny-lsh": _tiny_lsh,
    "tiny-xl": _tiny_xl,
    "tiny-mamba": _tiny_mamba,
}
