"""The decoder-only language model: every family lmforge serves, chosen by `Config`.

Reads top to bottom: embeddings (+ learned positions) -> n_layer blocks -> final norm -> LM head.
A block (`lmforge.models.block`) is a token mixer (attention: MHA/GQA/MQA with optional RoPE and sliding
window, or another family from `lmforge.models.mixers`) and a channel mixer (MLP, ...), chosen per layer by
`Config.block` / `Config.layers`, with one norm/residual rule around them: pre-norm (GPT-2, Llama),
post-norm (teenyGPT, the original Transformer) or parallel (Falcon).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.models.block import Block
from lmforge.models.cache import Cache
from lmforge.models.heads import Pooler, build_lm_head, output_layer
from lmforge.models.layers import RelativePositionBias, Rotary, make_norm, sinusoid_table
from lmforge.models.linear_ce import linear_cross_entropy
from lmforge.models.mixers import check_mixers
from lmforge.models.mixers.attention import Unpadded, build_mask
from lmforge.models.mixers.base import MixerContext


def matmul_flops(model: nn.Module) -> float:
    """Training FLOPs per token of `model`'s weight matmuls: 6 per trainable weight, 4 per frozen one.

    Every nn.Linear counts, the LM head included (tied or not, it is a real matmul); quantized layers
    (lmforge.quant swaps, no float `weight`) are frozen; batched MoE experts count what one token
    multiplies by (its top-k experts).
    """
    def per(trainable: bool) -> float:
        return 6.0 if trainable else 4.0

    n = sum(per(m.weight.requires_grad) * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    n += sum(4.0 * m.in_features * m.out_features for m in model.modules()
             if hasattr(m, "dequantize") and not isinstance(m, nn.Linear))
    n += sum(per(any(p.requires_grad for p in m.parameters())) * m.active_expert_params()
             for m in model.modules() if hasattr(m, "active_expert_params"))
    return n


def tied_key(cfg: Config) -> str | None:
    """State-dict key of the LM head's output weight when it is the token embedding, else None."""
    if not cfg.tie_embeddings or cfg.head == "none":
        return None
    if cfg.is_encoder_decoder:
        return "decoder.lm_head.weight"
    return "lm_head.decoder.weight" if cfg.head == "mlm" else "lm_head.weight"


class DecoderLM(nn.Module):
    """A causal language model. `model(input_ids)` maps (B, T) token ids to (B, T, vocab) logits.

    With `attention.causal=False` the same blocks form a bidirectional encoder (BERT, RoBERTa): padding
    is masked, token types are embedded, and `cfg.head` picks the LM head, BERT's MLM head or none (then
    `model(input_ids)` returns the hidden states).
    """

    accepts_targets = True  # forward(..., targets=labels) returns (nll, hit): see `head_nll`
    pack_padding = True  # a padded bidirectional batch runs on its real tokens only (`Unpadded`)

    def __init__(self, cfg: Config, init_weights: bool = True):
        super().__init__()
        self.config = check_mixers(cfg.validate())
        if cfg.is_encoder_decoder:
            raise ConfigError(f"config {cfg.name!r} is an encoder-decoder (encoder_layers={cfg.encoder_layers}): build "
                              "it with lmforge.models.make_model (an EncoderDecoderLM), not DecoderLM")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position.kind == "learned" else None
        self.rotary = Rotary(cfg) if cfg.position.kind == "rope" else None
        self.rel_bias = RelativePositionBias(cfg) if cfg.position.kind == "relative" else None
        if cfg.position.kind == "sinusoidal":  # fixed, so not saved with the weights
            self.register_buffer("sin_pos", sinusoid_table(cfg.block_size, cfg.d_model), persistent=False)
        else:
            self.sin_pos = None
        types = cfg.embedding.type_vocab_size
        self.type_emb = nn.Embedding(types, cfg.d_model) if types else None  # BERT segment A/B
        self.emb_norm = make_norm(cfg) if cfg.embedding.norm else None
        self.drop = nn.Dropout(cfg.embed_dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.has_attention = cfg.uses("attention")
        self.norm_f = make_norm(cfg) if cfg.norm.placement == "pre" else None
        self.lm_head = build_lm_head(cfg)
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.tie_weights()
        if init_weights and cfg.init == "gpt2":  # skipped when weights are about to be loaded
            self.apply(self._init_weights)
        if init_weights:  # mixers with parameters of their own meaning (Mamba's A, dt) re-set them
            for m in self.modules():
                if hasattr(m, "init_extra"):
                    m.init_extra()
        # Training switch, not architecture: each block's activations are recomputed in backward instead
        # of kept (non-reentrant torch.utils.checkpoint: same numbers, dropout replayed from saved RNG state).
        self.activation_checkpointing = False
        if cfg.bitlinear:  # ternary QAT: the same parameters, a forward through ternary weights
            from lmforge.quant.ternary import ternarize

            ternarize(self)

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head's output layer when the config ties them."""
        out = output_layer(self.lm_head)
        if self.config.tie_embeddings and out is not None:
            out.weight = self.tok_emb.weight

    @property
    def tied_key(self) -> str | None:
        """State-dict key of the output weight that is the token embedding (None when untied)."""
        return tied_key(self.config)

    def _init_weights(self, m: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections back into the residual stream get 1/sqrt(2L)
        # so the stream's variance does not grow with depth.
        std = self.config.init_std
        if isinstance(m, nn.Linear):
            resid = m is not self.lm_head and any(
                m is getattr(mixer, name, None) for b in self.blocks
                for mixer in (b.token_mixer, b.channel_mixer, b.cross_attn)
                if mixer is not None for name in getattr(mixer, "resid_projs", ()))
            nn.init.normal_(m.weight, std=std / math.sqrt(2 * self.config.n_layer) if resid else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, logits_to_keep: int = 0,
                segment_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None):
        """Logits (B, T, vocab), or (B, logits_to_keep, vocab) for the last positions when > 0.

        attention_mask: (B, T), 1 for real tokens and 0 for padding (left padding for a decoder). With a
        `cache`, the tokens continue what the cache holds, and the cache advances by T. segment_ids: (B, T)
        for packed rows (several examples in one row, each a contiguous run of one id): a token attends only
        within its segment and positions restart at 0 in each, so every example computes as it would alone.
        token_type_ids: BERT's segment A/B embeddings. A model with `head="none"` (a sentence encoder)
        returns its hidden states (B, T, C) instead of logits. memory / memory_mask: the encoder output
        (B, S, C) and its padding mask (B, S) that a decoder with cross-attention reads (see `EncoderDecoderLM`).
        targets: (B, T) next-token ids (-100 where nothing counts): returns `(nll, hit)` instead of logits,
        each (B, T): the fp32 negative log-likelihood (differentiable) and whether the argmax is the target,
        computed by `head_nll` without holding the (B, T, vocab) logits. It is a forward argument, not a
        separate method, so that DDP/FSDP wrappers (which act on forward) see the whole computation.
        """
        vt = getattr(self, "virtual_tokens", None)  # prompt/prefix tuning (lmforge.adapt.virtual) fill a new cache
        if cache is None and vt is not None and not vt.disabled:
            if segment_ids is not None:
                raise ValueError("virtual tokens (prompt/prefix tuning) cannot be used with packed rows")
            cache = vt.start(self, *input_ids.shape)
        x = self.hidden_states(input_ids, attention_mask=attention_mask, cache=cache, segment_ids=segment_ids,
                               token_type_ids=token_type_ids, attn_mask=attn_mask, memory=memory,
                               memory_mask=memory_mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if targets is not None:
            return self.head_nll(x, targets)
        return x if self.lm_head is None else self.head_logits(x)

    def head_nll(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, hit) of `targets` (B, T) under the LM head on hidden states `x` (B, T, C); see `forward`.

        A plain linear head goes through `linear_cross_entropy` in row chunks; any other head (BERT's MLM
        head, an adapted or quantized head) computes its logits, then the same quantities from them.
        """
        if self.lm_head is None:
            raise ConfigError("this model has no LM head (head: none): it cannot score next tokens")
        if self.config.embedding.tied_head_scale and self.config.tie_embeddings:
            x = x * self.config.d_model ** -0.5
        head = self.lm_head
        if type(head) is nn.Linear:
            return linear_cross_entropy(x, head.weight, head.bias, targets)
        logits = self.lm_head(x).float()  # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none").view_as(targets)
        with torch.no_grad():
            hit = (logits.argmax(-1) == targets) & (targets != -100)
        return nll, hit

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states (`hidden_states`' output, or rows picked from it)."""
        if self.config.embedding.tied_head_scale and self.config.tie_embeddings:
            x = x * self.config.d_model ** -0.5  # T5: the tied embedding's scale undone before the output layer
        exact = getattr(self.lm_head, "logits", None)  # a quantized head ranks its best tokens in fp32
        return exact(x) if exact is not None else self.lm_head(x)

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      cache: Cache | None = None, segment_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                      memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), after the final norm: what the LM head reads.

        inputs_embeds: (B, T, C) used instead of looking up `input_ids` (whose shape still gives B, T).
        token_type_ids: (B, T) segment A/B ids for models with token-type embeddings (default: all 0).
        attn_mask: (B, 1, T, T) bool, True = may attend: a caller's own visibility pattern (XLNet-style
        permutation orders) in place of the causal / padding mask; no cache.
        """
        if cache is not None and getattr(cache, "packed", False):
            return self._packed_hidden_states(input_ids, cache)
        T, device = input_ids.shape[1], input_ids.device
        start = cache.length if cache is not None else 0
        self._check_context(start, T, cache)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        positions = self._positions(input_ids, attention_mask, cache)
        mask, unpadded, padded = self._attention_mask(attention_mask, cache, start, T, device)
        if segment_ids is not None:  # packed examples: block-diagonal causal mask, positions per segment
            if cache is not None:
                raise ValueError("segment_ids (packed training rows) cannot be used with a KV cache")
            mask, positions = self._segment_mask(segment_ids, mask, device)
        if attn_mask is not None:
            if cache is not None or unpadded is not None or segment_ids is not None:
                raise ValueError("attn_mask replaces the model's own mask: use it without a cache, padding or segments")
            mask = attn_mask.to(torch.bool)
        if self.rel_bias is not None:  # T5: one additive bias for all layers, with the mask folded in
            if unpadded is not None:
                mask, unpadded = unpadded.attn_mask, None
            mask = self._with_relative_bias(mask, start, T, device)

        x = self._embed(input_ids, positions, inputs_embeds, token_type_ids)  # (B, T, C)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        ctx = MixerContext(positions, rope, mask, attention_mask if padded and unpadded is None else None, start,
                           memory, memory_mask)
        x = self._run_blocks(x, ctx, cache, unpadded)
        if cache is not None:
            cache.length = start + T
            cache.next_pos += attention_mask.sum(1) if attention_mask is not None else T
        return self.norm_f(x) if self.norm_f is not None else x

    def _check_context(self, start: int, T: int, cache: Cache | None) -> None:
        """Refuse T new tokens after `start` that do not fit the context (or the cache); say why when it helps."""
        cfg = self.config
        if cache is not None and not cfg.attention.causal:
            raise ConfigError("a bidirectional encoder has no KV cache: it reads its whole input at once")
        limit = cache.max_len if cache is not None else cfg.block_size - cfg.embedding.position_offset
        if start + T > limit:
            why = ""
            if cfg.attention.sliding_window and self.has_attention:
                why = (f"; the sliding window ({cfg.attention.sliding_window}) limits what a token sees, "
                       "not how long a sequence may be")
            elif not self.has_attention and self.rotary is None and self.pos_emb is None:
                why = "; this model has no position limit: raise block_size (e.g. replace(block_size=...))"
            raise ConfigError(f"sequence of {start + T} tokens exceeds the context of {limit} "
                              f"(or the cache's capacity){why}")

    def _positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   cache: Cache | None) -> torch.Tensor:
        """Position ids (B, T). Left padding shifts each row so its first real token has position 0."""
        B, T = input_ids.shape
        if attention_mask is not None:
            offsets = attention_mask.long().cumsum(1) - 1
        else:
            offsets = torch.arange(T, device=input_ids.device).expand(B, T)
        base = cache.next_pos.unsqueeze(1) if cache is not None else 0
        return (base + offsets).clamp(min=0) + self.config.embedding.position_offset

    def _attention_mask(self, attention_mask: torch.Tensor | None, cache: Cache | None, start: int, T: int,
                        device: torch.device) -> tuple:
        """(mask, unpadded, padded) for the self-attention of T tokens after `start`, and the cache's key mask
        advanced over them. mask is None whenever SDPA's built-in causal mask (or no mask for one query) is
        exact; unpadded is an `Unpadded` (then also the mask) when a bidirectional model leaves padding out."""
        cfg = self.config
        window = cfg.attention.sliding_window
        L = start + T
        padded = attention_mask is not None and not attention_mask.all()
        if cache is not None:
            cache.key_mask[:, start:L] = True if attention_mask is None else attention_mask
            cache.has_padding = cache.has_padding or padded
            needs_mask = cache.has_padding or (window is not None and L > window) or (T > 1 and start > 0)
            key_valid = cache.key_mask if cache.has_padding else None
        else:
            needs_mask = padded or (window is not None and T > window)
            key_valid = attention_mask if padded else None
        needs_mask = needs_mask and self.has_attention and cfg.attention.causal
        mask = build_mask(key_valid, start, T, L, window, device, cfg.attention.global_tokens) if needs_mask else None
        unpadded = None
        if not cfg.attention.causal and padded:
            # bidirectional: every query sees every real key; padding is left out of the computation, unless
            # `pack_padding` is off (lmforge.inspect: every position computed, as transformers does, with hooks
            # seeing (B, T, C) activations)
            mask = unpadded = Unpadded(attention_mask) if self.pack_padding else None
            if mask is None:
                mask = attention_mask[:, None, None, :]  # (B, 1, 1, T): padding keys masked
        return mask, unpadded, padded

    def _segment_mask(self, segment_ids: torch.Tensor, mask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, positions) of packed rows (B, T): a token sees only its own segment, positions restart in each."""
        B, T = segment_ids.shape
        idx = torch.arange(T, device=device).expand(B, T)
        first = torch.ones_like(segment_ids, dtype=torch.bool)
        first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        positions = idx - torch.where(first, idx, torch.zeros_like(idx)).cummax(1).values
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)  # (B, 1, T, T)
        a = self.config.attention
        causal = build_mask(None, 0, T, T, a.sliding_window, device, a.global_tokens) if mask is None else mask
        return same & causal, positions

    def _with_relative_bias(self, mask, start: int, T: int, device: torch.device) -> torch.Tensor:
        """T5's relative position bias (1, nh, T, L) with a bool mask folded in as the dtype's minimum."""
        a = self.config.attention
        L = start + T
        if mask is None and a.causal and T > 1:
            mask = build_mask(None, start, T, L, a.sliding_window, device, a.global_tokens)
        bias = self.rel_bias.table(start, T, L)  # (1, nh, T, L)
        return bias if mask is None else bias.masked_fill(~mask, torch.finfo(bias.dtype).min)

    def _run_blocks(self, x: torch.Tensor, ctx: MixerContext, cache: Cache | None, unpadded) -> torch.Tensor:
        """The blocks on embeddings x (B, T, C); without a cache, packed when `unpadded` and checkpointed when on."""
        if cache is not None:
            for block, state in zip(self.blocks, cache.layers):
                x = block(x, ctx, state)
            return x
        if unpadded is not None:
            x = unpadded.pack(x)  # (1, N + 1, C); attention spreads its Q/K/V (and rotates them) per row
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return unpadded.unpack(x) if unpadded is not None else x  # (B, T, C), zeros at padding

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.embedding.scale:
            x = x * math.sqrt(self.config.d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        if self.sin_pos is not None:
            x = x + self.sin_pos[positions].to(x.dtype)
        if self.type_emb is not None:
            x = x + (self.type_emb(token_type_ids) if token_type_ids is not None else self.type_emb.weight[0])
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return self.drop(x) if self.training and self.drop.p else x

    def _packed_hidden_states(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Hidden states for a packed cache (`lmforge.infer.paged.PagedBatch`): input_ids (1, N) holds the new
        tokens of several sequences back to back, `cache.positions` (N,) gives each its position, and each
        attention layer's state computes attention per sequence (`state.attend`), so no padding or mask is
        built here. The engine uses it to run decode rows and prompt chunks of many requests in one pass."""
        if self.rel_bias is not None:
            raise ConfigError("a model with relative position biases (T5) has no packed path: its bias would need "
                              "a per-sequence table; generate with LLM.generate instead of the serving engine")
        positions = cache.positions.unsqueeze(0) + self.config.embedding.position_offset  # (1, N)
        x = self._embed(input_ids, positions)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        ctx = MixerContext(positions, rope, None, None, 0)
        for block, state in zip(self.blocks, cache.layers):
            x = block(x, ctx, state)
        return self.norm_f(x) if self.norm_f is not None else x

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (MoE load balancing, router z-loss) of the last forward, or None.

        The training objective adds it to the loss; mixers leave theirs in `last_aux_loss`."""
        losses = [m.last_aux_loss for m in self.modules() if getattr(m, "last_aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    def moe_stats(self) -> dict[str, torch.Tensor]:
        """Routing statistics of the last forward summed over MoE layers (dropped assignments/tokens, losses)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules():
            for key, v in getattr(m, "last_stats", {}).items():
                out[key] = out[key] + v if key in out else v
        return out

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
        """Training FLOPs per token (forward + backward) for what trains now, plus attention scores.

        As in PaLM's appendix B / nanochat: 6 per matmul weight (2 forward, 2 for the input's gradient, 2
        for the weight's) plus 12 * n_layer * n_head * head_dim * T. A frozen weight (a LoRA / QLoRA base,
        a quantized layer, a frozen head) needs no weight gradient: 4 per weight. Layers below every trainable
        parameter need no input gradient either; that saving is not counted.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        return matmul_flops(self) + 12.0 * self._n_attention_layers() * cfg.n_head * cfg.head_dim * T

    def _n_attention_layers(self) -> int:
        return sum(token == "attention" for token, _ in self.config.layer_mixers())

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of KV cache one token occupies: 2 (K and V) x attention layers x KV heads x head_dim x size.

        Recurrent layers keep a state of fixed size instead (see `new_cache(...).bytes()`)."""
        cfg = self.config
        size = torch.empty((), dtype=dtype or self.tok_emb.weight.dtype).element_size()
        return 2 * self._n_attention_layers() * cfg.n_kv_head * cfg.head_dim * size

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> Cache:
        """A decode cache for `batch_size` rows and up to `max_len` (default: context) slots: each
        layer's state from its token mixer (preallocated KV buffers for attention).

        By default it holds the model's dtype, except that a bf16/fp16 model on the CPU keeps an fp32
        cache: PyTorch's CPU attention is several times slower in bf16 than in fp32 for the single query
        of a decode step (SmolLM2 shape, 350 keys: 339 us vs 42 us), so attention then runs in fp32 on
        the exactly upcast keys and values and its output is cast back.
        """
        p = self.tok_emb.weight
        if dtype is None:
            dtype = torch.float32 if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        vt = getattr(self, "virtual_tokens", None)
        vt = vt if vt is not None and not vt.disabled else None
        max_len = min((max_len or self.config.block_size) + (vt.n if vt else 0), self.config.block_size)
        states = [b.token_mixer.new_state(batch_size, max_len, dtype, p.device) for b in self.blocks]
        cache = Cache(states, batch_size, max_len, p.device)
        if vt is not None:
            vt.fill(self, cache)
        return cache
