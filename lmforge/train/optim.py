"""AdamW with decay on matrices only, and the learning-rate schedule (linear warmup, cosine to min_lr)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    """AdamW and schedule hyper-parameters (the `optim` section of a recipe)."""

    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine floor
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = 0.1  # on 2D+ parameters only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    fused: bool = True  # fused AdamW kernel where this torch/device has it (falls back otherwise)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2D+ tensors (matmul weights, embeddings) decay; biases and norm gains do not.

    Decaying a gain or bias pulls it toward 0, which only fights the normalisation (GPT-3, nanoGPT).
    Order is the model's parameter order, so an optimizer state saved by one run loads into another.
    """
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


_FUSED_OK: dict[str, bool] = {}


def _fused_available(device_type: str) -> bool:
    """Whether `AdamW(fused=True)` runs on this device with this torch (checked once on a tiny tensor)."""
    if device_type not in _FUSED_OK:
        try:
            p = nn.Parameter(torch.zeros(2, 2, device=device_type))
            p.grad = torch.ones_like(p)
            torch.optim.AdamW([p], lr=1e-3, fused=True).step()
            _FUSED_OK[device_type] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _FUSED_OK[device_type] = False
    return _FUSED_OK[device_type]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; fused when asked for and available (torch 2.13 CPU has it)."""
    device_type = next(model.parameters()).device.type
    fused = cfg.fused and _fused_available(device_type)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for the update that takes the model from `step` to `step + 1`.

    Linear warmup from lr/warmup to lr over `warmup_steps`, then `schedule` from lr down to `min_lr`
    at `max_steps`. A pure function of the step, so resuming needs no scheduler state.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
