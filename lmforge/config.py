"""Model configuration: one `Config` grouped into sub-configs, and the names of the block parts.

Every family lmforge serves (teenyGPT, GPT-2, Llama, Mistral, Qwen2, Falcon, SmolLM2, the block families,
the encoders) is one `Config`; `lmforge.models` reads nothing else. The named presets are in `lmforge.presets`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.errors import ConfigError

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]
GATED = ("swiglu", "geglu")
# Block parts by config name: the "module:Class" implementing each, which `lmforge.models.mixers` imports on
# first use (this module imports no model code). A new mixer is its module and one line here.
TOKEN_MIXERS: dict[str, str] = {
    "attention": "lmforge.models.mixers.attention:Attention",
    "mamba": "lmforge.models.mixers.mamba:Mamba",
    "s4d": "lmforge.models.mixers.s4d:S4D",
    "linear_attention": "lmforge.models.mixers.linear_attention:LinearAttention",
    "retention": "lmforge.models.mixers.retention:Retention",
    "rwkv": "lmforge.models.mixers.rwkv:RWKVTimeMix",
    "lstm": "lmforge.models.mixers.lstm:LSTM",
    "lsh_attention": "lmforge.models.mixers.lsh:LSHAttention",
    "xl_attention": "lmforge.models.mixers.xl:XLAttention",
}
CHANNEL_MIXERS: dict[str, str | None] = {  # "none": the block has no channel mixer (Mamba's)
    "mlp": "lmforge.models.layers:MLP",
    "moe": "lmforge.models.mixers.moe:MoE",
    "rwkv": "lmforge.models.mixers.rwkv:RWKVChannelMix",
    "none": None,
}
POSITION_KINDS = ("learned", "rope", "none", "sinusoidal", "relative")


@dataclass
class AttentionConfig:
    """Self-attention: heads, grouped/multi-query key-value heads, biases, sliding window."""

    n_head: int = 12
    n_kv_head: int | None = None  # None: = n_head (MHA); < n_head: GQA; 1: MQA
    head_dim: int | None = None  # None: d_model // n_head
    qkv_bias: bool = True
    out_bias: bool = True
    sliding_window: int | None = None  # Mistral: each query sees at most this many keys (itself included)
    global_tokens: int = 0  # with a window: the first slots stay visible to every query (Longformer/BigBird)
    dropout: float = 0.0
    causal: bool = True  # False: bidirectional (BERT-style encoders), padding masked
    scale: float | None = None  # scores q.k * scale; None: 1/sqrt(head_dim). T5: 1.0 (folded into its init)
    cross: bool = False  # blocks also attend to an encoder's output (the decoder of an encoder-decoder)


@dataclass
class MLPConfig:
    """Position-wise feed-forward block: hidden width and activation (gated ones use two input maps)."""

    hidden: int = 3072
    activation: Activation = "gelu"
    bias: bool = True


@dataclass
class MoEConfig:
    """Mixture of experts (channel mixer "moe"): experts, routing, capacity and auxiliary losses."""

    n_experts: int = 8
    top_k: int = 2
    hidden: int | None = None  # each expert's width; None: mlp.hidden (activation and gating from `mlp`)
    n_shared: int = 0  # always-on shared experts (DeepSeekMoE)
    capacity_factor: float | None = None  # None: no capacity limit, nothing dropped
    normalize_topk: bool = True  # renormalise the top-k gates to sum 1 (Mixtral)
    aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch Transformer uses 0.01)
    z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE uses 0.001)


@dataclass
class SSMConfig:
    """State-space token mixers (Mamba): state size, conv width, expansion, dt rank."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16), as Mamba
    conv_bias: bool = True
    proj_bias: bool = False


@dataclass
class LSHConfig:
    """LSH attention (token mixer "lsh_attention", Reformer): hash buckets, rounds, chunk length, rotation seed."""

    n_buckets: int = 8  # even (a rotation gives n_buckets / 2 directions and their negatives), or 1
    n_hashes: int = 2  # hash rounds, combined by their log-normalisers
    chunk_len: int = 32  # queries per chunk; each attends to its chunk and the previous one
    seed: int = 0  # the fixed random rotations are drawn from this seed


@dataclass
class XLConfig:
    """Transformer-XL attention (token mixer "xl_attention"): how many earlier hidden states a layer remembers."""

    mem_len: int = 64


@dataclass
class NormConfig:
    """Normalisation: kind, epsilon, and where it sits (pre-norm with a final norm, or post-norm)."""

    kind: Literal["layernorm", "rmsnorm"] = "layernorm"
    eps: float = 1e-5
    placement: Literal["pre", "post"] = "pre"
    bias: bool = True  # LayerNorm bias


@dataclass
class PositionConfig:
    """Positions: learned or sinusoidal absolute embeddings, rotary (RoPE) with optional scaling, T5's bucketed
    relative attention bias, or none (NoPE)."""

    kind: Literal["learned", "rope", "none", "sinusoidal", "relative"] = "learned"
    rope_theta: float = 10000.0
    # Hook for context extension: {"type": "linear", "factor": f} or the Llama-3 scheme
    # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None
    buckets: int = 32  # relative: number of distance buckets (T5: 32)
    max_distance: int = 128  # relative: distances beyond this share the last bucket (T5: 128)


@dataclass
class EmbeddingConfig:
    """Input-embedding extras of BERT-style encoders: segment (token-type) table, norm, position offset."""

    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0: none
    norm: bool = False  # a norm on the summed embeddings (BERT, RoBERTa)
    position_offset: int = 0  # first position id; RoBERTa counts from padding_idx + 1 = 2
    scale: bool = False  # token embeddings times sqrt(d_model) (Vaswani et al. 2017, section 3.4)
    tied_head_scale: bool = False  # T5: hidden states times d_model**-0.5 before a tied LM head


@dataclass
class Config:
    """A decoder-only language model, fully described.

    `family` names the checkpoint layout it maps to (`gpt2`, `llama`, `mistral`, `qwen2`, `falcon`,
    or `lmforge` for shapes no other library has, such as teenyGPT's post-norm blocks).
    """

    name: str = "custom"
    family: str = "lmforge"
    vocab_size: int = 50257
    block_size: int = 1024  # context length
    d_model: int = 768
    n_layer: int = 12
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    lsh: LSHConfig = field(default_factory=LSHConfig)
    xl: XLConfig = field(default_factory=XLConfig)
    # Every layer is "token_mixer+channel_mixer" (see lmforge.models.mixers): `block` for all layers,
    # `layers` (n_layer entries) per layer; an entry without "+channel" takes `block`'s channel mixer.
    block: str = "attention+mlp"
    layers: list[str] | None = None
    # > 0: an encoder-decoder (lmforge.models.seq2seq): this many bidirectional encoder blocks, and `n_layer`
    # decoder blocks with cross-attention; the decoder starts from `decoder_start_id` (T5: the pad id).
    encoder_layers: int = 0
    decoder_start_id: int | None = None
    parallel_residual: bool = False  # Falcon/GPT-J: x + attn(ln(x)) + mlp(ln(x)), one shared norm
    # What sits on the final hidden states (lmforge/models/heads.py): "linear" (the LM head), "mlm"
    # (BERT's dense + act + norm before the output layer) or "none" (the model returns hidden states).
    head: Literal["linear", "mlm", "none"] = "linear"
    pooler: bool = False  # BERT's pooler (dense + tanh on the first token), kept for interop
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    bitlinear: bool = False  # BitNet b1.58: train linears (not the LM head) ternary, see lmforge.quant.ternary
    embed_dropout: float = 0.0  # on token (+ position) embeddings
    resid_dropout: float = 0.0  # on each block's attention and MLP outputs
    # gpt2: N(0, init_std), scaled residual projections; t5: Mesh TensorFlow's fan-in scaled normal (no
    # attention scaling needs it)
    init: Literal["gpt2", "torch", "t5"] = "gpt2"
    init_std: float = 0.02
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def n_head(self) -> int:
        return self.attention.n_head

    @property
    def n_kv_head(self) -> int:
        return self.attention.n_kv_head or self.attention.n_head

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_head

    def layer_mixers(self) -> list[tuple[str, str]]:
        """(token mixer, channel mixer) of every layer, from `block` and `layers`."""
        default_token, _, default_channel = self.block.partition("+")
        out = []
        for spec in self.layers if self.layers is not None else [self.block] * self.n_layer:
            token, plus, channel = str(spec).partition("+")
            out.append((token, channel if plus else default_channel or "mlp"))
        return out

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_layers > 0

    def encoder_config(self) -> Config:
        """The encoder stack of an encoder-decoder: `encoder_layers` bidirectional blocks, hidden states out."""
        return self.replace(n_layer=self.encoder_layers, encoder_layers=0, head="none", pooler=False,
                            **{"attention.causal": False, "attention.cross": False})

    def decoder_config(self) -> Config:
        """The decoder stack of an encoder-decoder: causal blocks with cross-attention, and the LM head."""
        return self.replace(encoder_layers=0, **{"attention.causal": True, "attention.cross": True})

    def uses(self, mixer: str) -> bool:
        """Whether any layer uses this token or channel mixer."""
        return any(mixer in pair for pair in self.layer_mixers())

    # ---- validation and (de)serialisation -----------------------------------------------------
    def validate(self) -> Config:
        """Check that the numbers fit together; raise `ConfigError` naming the field otherwise.

        The settings one mixer alone reads (`moe`, `ssm`, `lsh`, `xl`, ...) are checked by that mixer's `check`
        (`lmforge.models.mixers.check_mixers`), which runs when a model is built.
        """

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config {self.name!r}: {msg}")

        for f in ("vocab_size", "block_size", "d_model", "n_layer"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0,
                 f"{f} must be a positive integer, got {getattr(self, f)!r}")
        a = self.attention
        need(a.n_head > 0, f"attention.n_head must be positive, got {a.n_head}")
        need(a.head_dim is not None or self.d_model % a.n_head == 0,
             f"d_model ({self.d_model}) must be divisible by attention.n_head ({a.n_head}) "
             "or attention.head_dim must be set")
        need(self.n_head % self.n_kv_head == 0,
             f"attention.n_head ({a.n_head}) must be a multiple of attention.n_kv_head ({self.n_kv_head})")
        need(a.sliding_window is None or a.sliding_window > 0, "attention.sliding_window must be positive")
        need(a.global_tokens >= 0 and (a.global_tokens == 0 or a.sliding_window is not None),
             "attention.global_tokens needs attention.sliding_window (global tokens widen a window)")
        need(self.position.kind != "rope" or self.head_dim % 2 == 0, "RoPE needs an even head_dim")
        need(self.mlp.hidden > 0, "mlp.hidden must be positive")
        need(self.mlp.activation in Activation.__args__,
             f"mlp.activation must be one of {list(Activation.__args__)}, got {self.mlp.activation!r}")
        need(self.norm.kind in ("layernorm", "rmsnorm"),
             f"norm.kind must be 'layernorm' or 'rmsnorm', got {self.norm.kind!r}")
        need(self.norm.placement in ("pre", "post"),
             f"norm.placement must be 'pre' or 'post', got {self.norm.placement!r}")
        need(self.position.kind in POSITION_KINDS,
             f"position.kind must be one of {', '.join(POSITION_KINDS)}, got {self.position.kind!r}")
        if self.position.kind == "relative":
            need(self.position.buckets >= 2 and self.position.max_distance > self.position.buckets // 2,
                 "position.buckets must be >= 2 and position.max_distance > buckets / 2 (T5: 32 and 128)")
        need(self.attention.scale is None or self.attention.scale > 0, "attention.scale must be positive (or null)")
        need(isinstance(self.encoder_layers, int) and self.encoder_layers >= 0, "encoder_layers must be >= 0")
        if self.attention.cross or self.encoder_layers:
            need(not self.parallel_residual, "cross-attention (an encoder-decoder) needs sequential blocks, "
                 "not parallel_residual")
            need(all(t == "attention" for t, _ in self.layer_mixers()),
                 "an encoder-decoder's blocks must use the attention token mixer")
        need(not (self.attention.cross and not self.attention.causal), "attention.cross needs a causal decoder")
        need(not (self.parallel_residual and self.norm.placement == "post"),
             "parallel_residual needs norm.placement='pre'")
        need(self.head in ("linear", "mlm", "none"), f"head must be 'linear', 'mlm' or 'none', got {self.head!r}")
        e = self.embedding
        need(e.type_vocab_size >= 0 and e.position_offset >= 0,
             "embedding.type_vocab_size and embedding.position_offset must be >= 0")
        need(e.position_offset == 0 or self.position.kind == "learned",
             "embedding.position_offset needs learned positions")
        need(self.layers is None or (isinstance(self.layers, list) and len(self.layers) == self.n_layer),
             f"layers must list one block per layer (n_layer={self.n_layer}), got {self.layers!r}")
        for i, (token, channel) in enumerate(self.layer_mixers()):
            where = f"layers[{i}]" if self.layers is not None else "block"
            need(token in TOKEN_MIXERS, f"{where}: unknown token mixer {token!r}; valid: {', '.join(TOKEN_MIXERS)} "
                 "(a block is written 'token+channel', e.g. 'attention+mlp')")
            need(channel in CHANNEL_MIXERS,
                 f"{where}: unknown channel mixer {channel!r}; valid: {', '.join(CHANNEL_MIXERS)}")
        need(not (self.parallel_residual and any(c == "none" for _, c in self.layer_mixers())),
             "parallel_residual needs a channel mixer in every layer")
        for f in ("embed_dropout", "resid_dropout"):
            need(0.0 <= getattr(self, f) < 1.0, f"{f} must be in [0, 1)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (the `model` section of `lmforge.json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a nested dict, rejecting unknown keys with the list of allowed ones."""
        return _from_dict(cls, d, prefix="").validate()

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted overrides applied, e.g. `replace(**{"attention.n_head": 4})`."""
        d = self.to_dict()
        for key, value in overrides.items():
            node = d
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"unknown config field {key!r}")
                node = node[p]
            if leaf not in node:
                raise ConfigError(f"unknown config field {key!r}; allowed here: {sorted(node)}")
            node[leaf] = value
        return Config.from_dict(d)


def _from_dict(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'model'!r} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config field(s) {sorted(prefix + u for u in unknown)}; "
                          f"allowed: {sorted(prefix + f for f in fields)}")
    kwargs = {}
    for name, value in d.items():
        sub = _SUBCONFIGS.get(name) if cls is Config else None
        kwargs[name] = _from_dict(sub, value, prefix + name + ".") if sub else value
    return cls(**kwargs)


_SUBCONFIGS = {"attention": AttentionConfig, "mlp": MLPConfig, "norm": NormConfig, "position": PositionConfig,
               "embedding": EmbeddingConfig, "moe": MoEConfig, "ssm": SSMConfig, "lsh": LSHConfig,
               "xl": XLConfig}
