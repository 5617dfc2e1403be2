"""Heads: small modules that read a model's final hidden states (B, T, C).

A head is not a model subclass: the one model (`DecoderLM`, causal or bidirectional) computes hidden
states, and a head turns them into what a task needs. The model owns its LM head (built here by
`build_lm_head`) and, for BERT checkpoints, the pooler; task heads are separate modules a trainer or
user puts beside the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.models.layers import _ACT, make_norm

# ================================================================================================
# Encoder heads: LM / masked LM, pooler, pooling, sequence and token classification
# ================================================================================================


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head: dense -> activation -> norm -> output layer (tied to the embeddings) + bias.

    Devlin et al. 2019 (BERT), the `cls.predictions` module of the released checkpoints; RoBERTa's
    `lm_head` is the same computation.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = _ACT[cfg.mlp.activation]
        self.norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))  # (B, T, vocab)


def build_lm_head(cfg: Config) -> nn.Module | None:
    """The model's own head for `cfg.head`: a linear LM head, BERT's MLM head, or None (hidden states)."""
    if cfg.head == "none":
        return None
    if cfg.head == "mlm":
        return MaskedLMHead(cfg)
    return nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)


def output_layer(head: nn.Module | None) -> nn.Linear | None:
    """The vocabulary projection inside an LM head (the one tied to the token embeddings)."""
    return head.decoder if isinstance(head, MaskedLMHead) else head


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[:, 0])), the [CLS] summary that BERT's classifiers read."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, kind: str = "mean",
         normalize: bool = False) -> torch.Tensor:
    """One vector per sequence from hidden states (B, T, C): mean over real tokens, or the first ([CLS]).

    Mean pooling divides by the number of real tokens (padding excluded), as sentence-transformers does;
    `normalize` scales each vector to unit L2 norm, so dot products are cosine similarities.
    """
    if kind == "cls":
        out = hidden[:, 0]
    elif kind == "mean":
        if attention_mask is None:
            out = hidden.mean(1)
        else:
            m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    else:
        raise ValueError(f"pooling kind must be 'mean' or 'cls', got {kind!r}")
    return F.normalize(out, p=2, dim=-1) if normalize else out


class SentenceEmbeddingHead(nn.Module):
    """Pooled sentence embedding (mean or CLS, optionally L2-normalised); no parameters."""

    def __init__(self, kind: str = "mean", normalize: bool = True):
        super().__init__()
        if kind not in ("mean", "cls"):
            raise ValueError(f"pooling kind must be 'mean' or 'cls', got {kind!r}")
        self.kind, self.normalize = kind, normalize

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return pool(hidden, attention_mask, self.kind, self.normalize)  # (B, C)


class SequenceClassificationHead(nn.Module):
    """Logits (B, n_classes) for a whole sequence: pooled hidden state -> dropout -> dense -> tanh -> linear."""

    def __init__(self, d_model: int, n_classes: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, n_classes)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = pool(hidden, attention_mask, self.pooling)  # (B, C)
        return self.out(self.drop(torch.tanh(self.dense(self.drop(x)))))


class TokenClassificationHead(nn.Module):
    """Logits (B, T, n_classes) for every token: dropout -> linear."""

    def __init__(self, d_model: int, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, n_classes)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.drop(hidden))

# ================================================================================================
# (end of encoder heads)
# ================================================================================================
