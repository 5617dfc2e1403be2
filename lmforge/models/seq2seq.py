"""Encoder-decoder models (the original Transformer, T5) built from the one model's blocks.

An `EncoderDecoderLM` is two `DecoderLM` stacks sharing one token embedding: the encoder is the same
blocks with `attention.causal=False` and no head (hidden states out); the decoder is causal blocks with a
cross-attention sublayer (`attention.cross`) between self-attention and the MLP, and the LM head:

    memory = encoder(x_src)                    # (B, S, C), read whole, padding masked
    logits = decoder(y_in, memory)             # (B, T, vocab); y_in = [start] + y[:-1]

Decoding reuses the decoder's KV cache; each layer's cross-attention keys/values are computed from
`memory` at the first step and kept in that layer's cache state (`KVState.cross`). `bind(memory)` gives
a decoder-only view with the encoder output attached, which the one generator (`lmforge.infer.generate`:
greedy, sampling, beam search) runs like any decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.models.cache import Cache
from lmforge.models.decoder import DecoderLM, matmul_flops


class EncoderDecoderLM(nn.Module):
    """An encoder-decoder language model. `model(input_ids, decoder_input_ids=...)` -> (B, T, vocab) logits.

    `cfg.encoder_layers` encoder blocks and `cfg.n_layer` decoder blocks; everything else (widths, norms,
    positions, MLP) is shared by both stacks. State-dict keys: `tok_emb.weight` (shared), `encoder.*`,
    `decoder.*` (each stack's own keys, as a `DecoderLM`'s).
    """

    def __init__(self, cfg: Config, init_weights: bool = True):
        super().__init__()
        self.config = cfg.validate()
        if not cfg.is_encoder_decoder:
            raise ConfigError(f"config {cfg.name!r} has encoder_layers=0: build a DecoderLM instead")
        gpt2_init = init_weights and cfg.init != "t5"
        self.encoder = DecoderLM(cfg.encoder_config(), init_weights=gpt2_init)
        self.decoder = DecoderLM(cfg.decoder_config(), init_weights=gpt2_init)
        # one embedding table for source, target and (when tied) the output layer (Vaswani et al. 3.4, T5)
        self.tok_emb = self.decoder.tok_emb
        for stack in (self.encoder, self.decoder):
            del stack._modules["tok_emb"]
            object.__setattr__(stack, "tok_emb", self.tok_emb)  # reachable, but saved once (here)
        self.tie_weights()
        if init_weights and cfg.init == "t5":
            self.apply(self._t5_init)

    def tie_weights(self) -> None:
        """Share the token embedding with the decoder's output layer when the config ties them."""
        self.decoder.tie_weights()

    @property
    def tied_key(self) -> str | None:
        """State-dict key of the output weight that is the token embedding (None when untied)."""
        from lmforge.models.decoder import tied_key

        return tied_key(self.config)

    @property
    def activation_checkpointing(self) -> bool:
        return self.decoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.encoder.activation_checkpointing = self.decoder.activation_checkpointing = on

    @torch.no_grad()
    def _t5_init(self, m: nn.Module) -> None:
        # Mesh TensorFlow / T5: each matrix N(0, fan_in**-0.5), queries also over head_dim (standing in for the
        # 1/sqrt(d) attention scaling T5 leaves out), embeddings N(0, 1).
        from lmforge.models.layers import MLP, RelativePositionBias
        from lmforge.models.mixers.attention import Attention, CrossAttention

        cfg = self.config
        d, inner = cfg.d_model, cfg.n_head * cfg.head_dim
        if isinstance(m, (Attention, CrossAttention)):
            q = m.qkv.weight[:inner] if isinstance(m, Attention) else m.q.weight
            kv = m.qkv.weight[inner:] if isinstance(m, Attention) else m.kv.weight
            q.normal_(0, (d * cfg.head_dim) ** -0.5)
            kv.normal_(0, d ** -0.5)
            m.proj.weight.normal_(0, inner ** -0.5)
        elif isinstance(m, MLP):
            m.fc.weight.normal_(0, d ** -0.5)
            m.proj.weight.normal_(0, cfg.mlp.hidden ** -0.5)
        elif isinstance(m, RelativePositionBias):
            m.weight.normal_(0, d ** -0.5)
        elif m is self.tok_emb or (m is self.decoder.lm_head and not cfg.tie_embeddings):
            m.weight.normal_(0, 1.0)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()

    # ---- forward -----------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, C) for source ids (B, S); attention_mask (B, S) 1 at real tokens."""
        return self.encoder(input_ids, attention_mask=attention_mask)

    def forward(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, cache: Cache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Decoder logits (B, T, vocab) for `decoder_input_ids` given the source `input_ids` (or its encoded
        `memory`). attention_mask: the source's padding mask; with a `cache`, the decoder continues it."""
        if decoder_input_ids is None:
            raise ConfigError(f"{self.config.name!r} is an encoder-decoder: pass decoder_input_ids (the target "
                              "shifted right, starting with decoder_start_id) besides input_ids, or use "
                              "llm.generate(text) to decode")
        if memory is None:
            if input_ids is None:
                raise ConfigError("pass the source input_ids (or its encoder output as memory=)")
            memory = self.encode(input_ids, attention_mask)
        return self.decoder(decoder_input_ids, attention_mask=decoder_attention_mask, cache=cache,
                            logits_to_keep=logits_to_keep, memory=memory, memory_mask=attention_mask)

    def bind(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> BoundDecoder:
        """The decoder with this encoder output attached: a decoder-only model for the generator."""
        return BoundDecoder(self, memory, memory_mask)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> Cache:
        """The decoder's cache (self-attention KV buffers; cross-attention K/V are added at the first step)."""
        return self.decoder.new_cache(batch_size, max_len, dtype)

    # ---- accounting --------------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        """Sum of both stacks' auxiliary losses (MoE), or None."""
        losses = [x for x in (self.encoder.aux_loss(), self.decoder.aux_loss()) if x is not None]
        return torch.stack(losses).sum() if losses else None

    def moe_stats(self) -> dict[str, torch.Tensor]:
        """Both stacks' routing statistics."""
        a, b = self.encoder.moe_stats(), self.decoder.moe_stats()
        return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the shared embedding once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def estimate_flops(self, seq_len: int | None = None) -> float:
        """Training FLOPs per target token (forward + backward) when source and target both have `seq_len`
        tokens: 6 per trainable matmul weight and 4 per frozen one (`decoder.matmul_flops`), plus attention
        scores of encoder self-, decoder self- and cross-attention."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return matmul_flops(self) + 12.0 * (cfg.encoder_layers + 2 * cfg.n_layer) * cfg.n_head * cfg.head_dim * T


class BoundDecoder(nn.Module):
    """An encoder-decoder's decoder with one batch's encoder output attached, shaped like a `DecoderLM`
    (`config`, `tok_emb`, `new_cache`, `model(ids, cache=...)`), so the generator decodes it unchanged.

    The first call with a cache stores each layer's cross-attention keys/values in it; later steps (and
    beams made from it by `Cache.repeat_rows`) read them from there, so `memory` is projected once per input.
    """

    def __init__(self, model: EncoderDecoderLM, memory: torch.Tensor, memory_mask: torch.Tensor | None):
        super().__init__()
        self.decoder = model.decoder
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "memory_mask", memory_mask)

    @property
    def config(self) -> Config:
        return self.decoder.config

    @property
    def tok_emb(self) -> nn.Embedding:
        return self.decoder.tok_emb

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> Cache:
        return self.decoder.new_cache(batch_size, max_len, dtype)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        first = cache is None or cache.layers[0].cross is None
        if first and input_ids.shape[0] != self.memory.shape[0]:
            raise ConfigError(f"{input_ids.shape[0]} decoder rows for an encoder output of {self.memory.shape[0]}")
        return self.decoder(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=logits_to_keep,
                            memory=self.memory if first else None, memory_mask=self.memory_mask if first else None)

