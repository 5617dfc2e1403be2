"""Tiny models for tests: a `tiny-<family>` preset, shrunk or reshaped by overrides, built under a fixed seed."""

from __future__ import annotations

import torch
from torch import nn

import lmforge
from lmforge.models import make_model


def tiny_cfg(family: str, **overrides) -> lmforge.Config:
    """The `tiny-<family>` preset (`"llama"` or `"tiny-llama"` alike) with dotted `overrides` applied.

    Families: gpt2, llama, mistral, qwen2, falcon, teenygpt, moe, jamba, linear, retnet, rwkv, lstm, s4d, lsh,
    xl, mamba, bert, roberta, t5, transformer-base (see `lmforge.list_presets()`).
    """
    cfg = lmforge.get_preset(family if family.startswith("tiny-") else f"tiny-{family}")
    return cfg.replace(**overrides) if overrides else cfg


def tiny_llm(family: str, seed: int = 0, *, train: bool = False, **overrides) -> nn.Module:
    """A random-weight model for `tiny_cfg(family, **overrides)`, initialised right after `torch.manual_seed(seed)`.

    It comes in eval mode (dropout off) unless `train`; a decoder-only config gives a `DecoderLM`, an
    encoder-decoder one an `EncoderDecoderLM`, exactly as `DecoderLM(cfg)` or `make_model(cfg)` would after the
    same seed.
    """
    torch.manual_seed(seed)
    model = make_model(tiny_cfg(family, **overrides))
    return model.train() if train else model.eval()
