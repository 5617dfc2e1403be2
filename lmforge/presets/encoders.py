"""Presets for bidirectional encoders (BERT, RoBERTa, MiniLM) and encoder-decoders (T5, the Transformer),
each citing where its numbers come from.

They are ordinary `Config`s: the same blocks as the decoders with `attention.causal=False`, post-norm,
token-type embeddings and a norm on the embeddings. `lmforge.presets` merges this table into
`PRESETS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmforge.config import AttentionConfig, Config, EmbeddingConfig, MLPConfig, NormConfig, PositionConfig


def _bert_like(name: str, family: str, *, vocab: int, ctx: int, d: int, layers: int, heads: int, ffn: int,
               types: int, offset: int = 0, head: str = "mlm", pooler: bool = False, pad_id: int = 0) -> Config:
    # Devlin et al. 2019, "BERT", section 3 and the released config.json files: post-LayerNorm blocks
    # (eps 1e-12), exact-erf GELU, learned absolute positions, token-type embeddings, a LayerNorm on the
    # summed embeddings, biases everywhere, MLM output tied to the word embeddings, init N(0, 0.02).
    return Config(
        name=name, family=family, vocab_size=vocab, block_size=ctx, d_model=d, n_layer=layers,
        attention=AttentionConfig(n_head=heads, causal=False), mlp=MLPConfig(hidden=ffn, activation="gelu"),
        norm=NormConfig(kind="layernorm", eps=1e-12, placement="post"), position=PositionConfig(kind="learned"),
        embedding=EmbeddingConfig(type_vocab_size=types, norm=True, position_offset=offset),
        head=head, pooler=pooler, tie_embeddings=True, pad_id=pad_id,
    )


def _bert_base() -> Config:
    # bert-base-uncased config.json: 12 layers, d 768, 12 heads, FFN 3072, vocab 30522, 512 positions,
    # 2 token types. 110M parameters.
    return _bert_like("bert-base", "bert", vocab=30522, ctx=512, d=768, layers=12, heads=12, ffn=3072, types=2)


def _roberta_base() -> Config:
    # Liu et al. 2019, "RoBERTa", and roberta-base config.json: BERT-base shape, byte-level BPE vocab
    # 50265, 514 position rows of which the first two are unused (positions start at padding_idx + 1 = 2),
    # 1 token type, pad id 1, LayerNorm eps 1e-5.
    c = _bert_like("roberta-base", "roberta", vocab=50265, ctx=514, d=768, layers=12, heads=12, ffn=3072,
                   types=1, offset=2, pad_id=1)
    c.norm.eps, c.bos_id, c.eos_id = 1e-5, 0, 2
    return c


def _minilm_l6() -> Config:
    # sentence-transformers/all-MiniLM-L6-v2 config.json (Wang et al. 2020, "MiniLM", distilled from
    # microsoft/MiniLM-L12-H384 and fine-tuned for sentence embeddings): 6 layers, d 384, 12 heads,
    # FFN 1536, vocab 30522, 512 positions, 2 token types, post-LN, GELU. A BertModel: no MLM head,
    # with the pooler.
    return _bert_like("minilm-l6", "bert", vocab=30522, ctx=512, d=384, layers=6, heads=12, ffn=1536, types=2,
                      head="none", pooler=True)


def _tiny(kind: str) -> Config:
    """Tiny shapes of each encoder for tests: same code paths, a few thousand parameters."""
    if kind == "roberta":
        c = _bert_like("tiny-roberta", "roberta", vocab=256, ctx=66, d=64, layers=2, heads=4, ffn=128, types=1,
                       offset=2, pad_id=1)
        c.norm.eps = 1e-5
        return c
    return _bert_like("tiny-bert", "bert", vocab=256, ctx=64, d=64, layers=2, heads=4, ffn=128, types=2)


ENCODER_PRESETS: dict[str, Any] = {
    "bert-base": _bert_base,
    "roberta-base": _roberta_base,
    "minilm-l6": _minilm_l6,
    "tiny-bert": lambda: _tiny("bert"),
    "tiny-roberta": lambda: _tiny("roberta"),
}


# ---- encoder-decoders -----------------------------------------------------------------------------

def _t5(name: str, *, vocab: int, d: int, layers: int, heads: int, ffn: int, d_kv: int = 64,
        gated: bool = False, tied: bool = True) -> Config:
    # Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
    # (T5), section 2.1, and the released t5-small config.json: pre-norm blocks with a scale-only RMS norm
    # (no bias, no mean subtraction, eps 1e-6), no absolute positions but a learned bias per head and
    # relative-distance bucket (32 buckets, max distance 128; bidirectional in the encoder, causal in the
    # decoder), no biases anywhere, no 1/sqrt(d) attention scaling (folded into the init), ReLU FFN (v1.1:
    # gated GELU, untied head), embeddings shared by encoder, decoder and (v1) the output layer, whose input
    # is then scaled by d_model**-0.5. Vocabulary 32128 (SentencePiece 32000 + 100 sentinels, padded);
    # pad 0 (also the decoder's start token), EOS 1. Dropout 0 for pre-training (T5 v1.1 turns it off).
    return Config(
        name=name, family="t5", vocab_size=vocab, block_size=512, d_model=d, n_layer=layers, encoder_layers=layers,
        attention=AttentionConfig(n_head=heads, head_dim=d_kv if d_kv * heads != d else None, qkv_bias=False,
                                  out_bias=False, scale=1.0),
        mlp=MLPConfig(hidden=ffn, activation="geglu" if gated else "relu", bias=False),
        norm=NormConfig(kind="rmsnorm", eps=1e-6, placement="pre", bias=False),
        position=PositionConfig(kind="relative", buckets=32, max_distance=128),
        embedding=EmbeddingConfig(tied_head_scale=tied), tie_embeddings=tied, init="t5",
        pad_id=0, eos_id=1, decoder_start_id=0,
    )


def _transformer_base(name: str = "transformer-base", *, vocab: int = 37000, d: int = 512, layers: int = 6,
                      heads: int = 8, ffn: int = 2048, ctx: int = 512) -> Config:
    # Vaswani et al. 2017, "Attention Is All You Need", Table 3 (base): 6 + 6 layers, d_model 512, 8 heads,
    # FFN 2048 with ReLU, post-LayerNorm residual blocks ("LayerNorm(x + Sublayer(x))", section 5.4),
    # sinusoidal positions (3.5), embeddings shared by source, target and the pre-softmax layer and scaled by
    # sqrt(d_model) (3.4), a shared source-target BPE vocabulary of about 37000 tokens (5.1). Biases as in the
    # reference tensor2tensor code; LayerNorm eps 1e-6 as there. Dropout 0 here (the paper trains with 0.1:
    # set resid_dropout / embed_dropout).
    return Config(
        name=name, family="lmforge", vocab_size=vocab, block_size=ctx, d_model=d, n_layer=layers,
        encoder_layers=layers, attention=AttentionConfig(n_head=heads), mlp=MLPConfig(hidden=ffn, activation="relu"),
        norm=NormConfig(kind="layernorm", eps=1e-6, placement="post"), position=PositionConfig(kind="sinusoidal"),
        embedding=EmbeddingConfig(scale=True), tie_embeddings=True,
    )


ENCODER_PRESETS.update({
    "t5-small": lambda: _t5("t5-small", vocab=32128, d=512, layers=6, heads=8, ffn=2048),
    # T5 v1.1 small (google/t5-v1_1-small config.json): gated GELU FFN 1024, 8 layers, 6 heads, d_kv 64, untied
    "t5-v1.1-small": lambda: _t5("t5-v1.1-small", vocab=32128, d=512, layers=8, heads=6, ffn=1024, gated=True,
                                 tied=False),
    "transformer-base": _transformer_base,
    # test sizes: same code paths, a few thousand parameters
    "tiny-t5": lambda: dataclasses.replace(_t5("tiny-t5", vocab=256, d=64, layers=2, heads=4, ffn=128, d_kv=16),
                                           block_size=128),
    "tiny-transformer-base": lambda: _transformer_base("tiny-transformer-base", vocab=256, d=64, layers=2,
                                                       heads=4, ffn=128, ctx=128),
})
