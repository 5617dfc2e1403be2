"""Sequence log-probabilities of responses, and the reference model as a context.

Every preference objective scores a response by the sum (or mean) of its tokens' log-probabilities
given everything before them. A batch holds the chosen and rejected sequences stacked, right-padded:

    input_ids: (2B, T)  rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected
    labels:    (2B, T)  the next token at each position (input_ids shifted left by one)
    loss_mask: (2B, T)  bool, True where the label is a response token (not prompt, not padding)
    attention_mask: (2B, T) 1 for real tokens (right padding: causal attention never sees it anyway)
    lengths:   (2B,)    tokens in each whole sequence (prompt + response)

The reference model of DPO/PPO is the same weights with the LoRA adapters switched off
(`lmforge.adapt.disable_adapters`), so alignment keeps one model in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.objectives import IGNORE_INDEX, accepts_targets


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at every position, (B, T), in fp32 (log-softmax of bf16 logits would round)."""
    logits = logits.float()
    # gather then subtract logsumexp: no (B, T, V) log-softmax tensor kept for backward
    picked = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs (N,), response token counts (N,)) of every row of the batch.

    A model that takes `targets` scores them through its LM head in row chunks, without (N, T, V) logits.
    """
    mask = batch["loss_mask"].bool()
    if accepts_targets(model):
        nll, _ = model(batch["input_ids"], targets=batch["labels"].masked_fill(~mask, IGNORE_INDEX))
        return -nll.sum(-1), mask.sum(-1)
    logits = model(batch["input_ids"])  # (N, T, V)
    lp = token_logps(logits, batch["labels"]).masked_fill(~mask, 0.0)
    return lp.sum(-1), mask.sum(-1)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The reference policy: `model` with its LoRA adapters disabled (same weights, no copy).

    Raises ConfigError when the model has no adapters: its reference would be the policy itself.
    """
    from lmforge.adapt import disable_adapters  # the adapt package knows how its modules switch off

    with disable_adapters(model):
        yield


class Reference:
    """Where reference log-probs come from: the policy with adapters off (default), or a frozen model.

    Args:
        model: a separate frozen reference model (full fine-tuning); None uses the policy with its LoRA
            adapters switched off, so only one model is in memory.
    """

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        if model is not None:
            model.eval().requires_grad_(False)

    def context(self, policy: nn.Module) -> tuple[nn.Module, contextlib.AbstractContextManager]:
        """(module to run, context to run it in) for reference scores of `policy`."""
        if self.model is not None:
            return self.model, contextlib.nullcontext()
        if not has_adapters(policy):
            raise ConfigError("the reference is the policy with its LoRA adapters off, but this model has no "
                              "adapters: apply LoRA first (lmforge.adapt.apply_lora, or method lora in the "
                              "recipe), or pass a frozen reference model")
        return policy, adapters_off(policy)

    @torch.no_grad()
    def logps(self, policy: nn.Module, batch: dict[str, torch.Tensor],
              fn: Callable = sequence_logps) -> torch.Tensor:
        """`fn(reference, batch)`'s first output, without gradients, in eval mode (no dropout)."""
        module, ctx = self.context(policy)
        was = module.training
        module.eval()
        try:
            with ctx:
                return fn(module, batch)[0]
        finally:
            module.train(was)


def has_adapters(model: nn.Module) -> bool:
    """Whether any module of `model` is a LoRA-family adapter the adapt package can switch off."""
    try:
        import lmforge.adapt as adapt
    except ImportError:
        return False
    if hasattr(adapt, "has_adapters"):
        return bool(adapt.has_adapters(model))
    return any("lora" in type(m).__name__.lower() for m in model.modules())


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is True (over `dim`, or everything)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)
