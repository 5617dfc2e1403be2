"""Presets for bidirectional encoders (BERT, RoBERTa, MiniLM), each citing where its numbers come from.

They are ordinary `Config`s: the same blocks as the decoders with `attention.causal=False`, post-norm,
token-type embeddings and a norm on the embeddings. `config.py` merges this table into `PRESETS`.
"""

from __future__ import annotations

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
