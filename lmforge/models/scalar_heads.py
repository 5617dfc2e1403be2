"""Scalar heads on a decoder's hidden states: a sequence score (reward model) and per-token values (PPO).

A head is a small module applied to `DecoderLM.hidden_states(...)` (B, T, C), never a model subclass, so
the same decoder (full, LoRA-adapted, quantised) serves as its trunk. (Classification and pooling heads
for encoders live in `heads.py`.)
"""

from __future__ import annotations

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """(B,) index of each row's last real token (right padding); T - 1 without a mask."""
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    return (attention_mask.long().sum(1) - 1).clamp(min=0)


class ScalarHead(nn.Module):
    """Linear map from a hidden state (C,) to one number: a reward (at a sequence's last token) or a value.

    Initialised to small weights and a zero bias, so an untrained head scores every input near 0.
    """

    def __init__(self, d_model: int, std: float = 0.02):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (...) scores, in fp32."""
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()

    def sequence_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) hidden states -> (B,) score of each sequence, read at its last real token."""
        B, T, _ = hidden.shape
        idx = last_token_index(attention_mask, B, T, hidden.device)
        return self(hidden[torch.arange(B, device=hidden.device), idx])
