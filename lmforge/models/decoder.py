"""The decoder-only language model: every family lmforge serves, chosen by `Config`.

Reads top to bottom: embeddings (+ learned positions) -> n_layer blocks -> final norm -> LM head.
A block is pre-norm (GPT-2, Llama), post-norm (teenyGPT, the original Transformer) or parallel
(Falcon); attention is MHA/GQA/MQA with optional RoPE and sliding window.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import Config
from lmforge.models.attention import Attention, KVCache, build_mask
from lmforge.models.layers import MLP, Rotary, make_norm


class Block(nn.Module):
    """One transformer block: attention and MLP, each with a residual connection and a norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.placement = "parallel" if cfg.parallel_residual else cfg.norm.placement
        self.norm_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_2 = None if cfg.parallel_residual else make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, rope, mask, cache, layer):
        # x: (B, T, C)
        if self.placement == "pre":  # x + f(norm(x))
            x = x + self.drop(self.attn(self.norm_1(x), rope, mask, cache, layer))
            return x + self.drop(self.mlp(self.norm_2(x)))
        if self.placement == "post":  # norm(x + f(x))
            x = self.norm_1(x + self.drop(self.attn(x, rope, mask, cache, layer)))
            return self.norm_2(x + self.drop(self.mlp(x)))
        h = self.norm_1(x)  # parallel: x + attn(norm(x)) + mlp(norm(x))
        return x + self.drop(self.attn(h, rope, mask, cache, layer)) + self.drop(self.mlp(h))


class DecoderLM(nn.Module):
    """A causal language model. `model(input_ids)` maps (B, T) token ids to (B, T, vocab) logits."""

    def __init__(self, cfg: Config, init_weights: bool = True):
        super().__init__()
        self.config = cfg.validate()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position.kind == "learned" else None
        self.rotary = Rotary(cfg) if cfg.position.kind == "rope" else None
        self.drop = nn.Dropout(cfg.embed_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm.placement == "pre" else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if init_weights and cfg.init == "gpt2":  # skipped when weights are about to be loaded
            self.apply(self._init_weights)
        if cfg.bitlinear:  # ternary QAT: the same parameters, a forward through ternary weights
            from lmforge.quant.ternary import ternarize

            ternarize(self)

    def _init_weights(self, m: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections back into the residual stream get 1/sqrt(2L)
        # so the stream's variance does not grow with depth.
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            resid = m is not self.lm_head and any(m is b.attn.proj or m is b.mlp.proj for b in self.blocks)
            nn.init.normal_(m.weight, std=std / math.sqrt(2 * self.config.n_layer) if resid else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, logits_to_keep, vocab) for the last positions when > 0.

        attention_mask: (B, T), 1 for real tokens and 0 for left padding. With a `cache`, the tokens
        continue what the cache holds, and the cache advances by T.
        """
        x = self.hidden_states(input_ids, attention_mask=attention_mask, cache=cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), after the final norm: what the LM head reads."""
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        if start + T > (cache.max_len if cache is not None else cfg.block_size):
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {cfg.block_size} "
                             "(or the cache's capacity)")
        # positions: (B, T). Left padding shifts each row so its first real token has position 0.
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
            offsets = attention_mask.long().cumsum(1) - 1
        else:
            offsets = torch.arange(T, device=device).expand(B, T)
        base = cache.next_pos.unsqueeze(1) if cache is not None else 0
        positions = (base + offsets).clamp(min=0)

        # mask: None whenever SDPA's built-in causal mask (or no mask for one query) is exact
        window = cfg.attention.sliding_window
        L = start + T
        if cache is not None:
            cache.key_mask[:, start:L] = True if attention_mask is None else attention_mask
            cache.has_padding = cache.has_padding or attention_mask is not None and not attention_mask.all()
            needs_mask = cache.has_padding or (window is not None and L > window) or (T > 1 and start > 0)
            key_valid = cache.key_mask if cache.has_padding else None
        else:
            padded = attention_mask is not None and not attention_mask.all()
            needs_mask = padded or (window is not None and T > window)
            key_valid = attention_mask if padded else None
        mask = build_mask(key_valid, start, T, L, window, device) if needs_mask else None

        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.length = L
            cache.next_pos += attention_mask.sum(1) if attention_mask is not None else T
        return self.norm_f(x) if self.norm_f is not None else x

    # ---- accounting --------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` leaves out token/position tables."""
        n = sum(p.numel() for p in self.parameters()) + sum(self._quantized_weights().values())
        if non_embedding:
            n -= self.tok_emb.num_embeddings * self.tok_emb.embedding_dim
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def _quantized_weights(self) -> dict[str, int]:
        """Weights held by quantized layers (lmforge.quant swaps; they have no float `weight`): name -> count."""
        return {name: m.in_features * m.out_features for name, m in self.named_modules()
                if hasattr(m, "dequantize") and not isinstance(m, nn.Linear)}

    def estimate_flops(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention scores.

        As in PaLM's appendix B / nanochat: 6 * N_matmul + 12 * n_layer * n_head * head_dim * T.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        # every nn.Linear, the LM head included (tied or not, it is a real matmul)
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        n_matmul += sum(self._quantized_weights().values())
        return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of KV cache one token occupies: 2 (K and V) x layers x KV heads x head_dim x size."""
        cfg = self.config
        size = torch.empty((), dtype=dtype or self.tok_emb.weight.dtype).element_size()
        return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * size

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated KV cache for `batch_size` rows and up to `max_len` (default: context) slots.

        By default it holds the model's dtype, except that a bf16/fp16 model on the CPU keeps an fp32
        cache: PyTorch's CPU attention is several times slower in bf16 than in fp32 for the single query
        of a decode step (SmolLM2 shape, 350 keys: 339 us vs 42 us), so attention then runs in fp32 on
        the exactly upcast keys and values and its output is cast back.
        """
        p = self.tok_emb.weight
        if dtype is None:
            dtype = torch.float32 if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        return KVCache(self.config, batch_size, min(max_len or self.config.block_size, self.config.block_size),
                       dtype, p.device)
