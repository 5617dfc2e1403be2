"""XLNet-style permutation language modelling through attention masks (Yang et al. 2019), single stream.

For each sequence a factorisation order z (a uniformly random permutation of its positions) is drawn;
the last `predict_frac` of z (XLNet's partial prediction, K = 1 / predict_frac) are the targets. Position
i may attend to position j when j comes before i in z, or j = i:

    ell_perm(theta) = -E_z [ sum_{t > c} ln p_theta(x_{z_t} | x_{z_<t}) ]

This is a **single-stream approximation**, not XLNet's two-stream attention: the input at a target
position is replaced by [MASK] (so its query knows where it is but not what it holds, the job of
XLNet's query stream), and therefore a later target cannot see an earlier target's content (XLNet's
content stream would show it). Non-target positions keep their content and see each other in z order.

Randomness as in `masked.py`: torch's checkpointed global RNG while training (resume is exact), a
generator seeded by the batch's content for evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.masked import _content_seed
from lmforge.train.objectives import IGNORE_INDEX, Batch, Objective, add_aux_loss


def permutation_masks(B: int, T: int, predict_frac: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rank (B, T), targets (B, T) bool, visibility (B, 1, T, T) bool) for random factorisation orders.

    rank[b, i] is position i's step in the order; the last round(T * predict_frac) steps (at least one)
    are targets; query i sees key j iff rank[j] < rank[i] or j == i.
    """
    rank = torch.rand(B, T, generator=generator, device=device).argsort(1).argsort(1)
    n_pred = max(1, round(T * predict_frac))
    targets = rank >= T - n_pred
    visible = (rank[:, None, :] < rank[:, :, None]) | torch.eye(T, dtype=torch.bool, device=device)
    return rank, targets, visible.unsqueeze(1)


class PermutationLM(Objective):
    """Permutation LM (single-stream approximation, see the module docstring).

    Args:
        predict_frac: share of each order that is predicted (XLNet: 1/6 to 1/7).
        reduction, mask_padding: accepted for the recipe's common options.
    Needs `bind(tokenizer)` for the [MASK] id. Stats: nll, tokens (targets), correct.
    """

    name = "permutation_lm"

    def __init__(self, predict_frac: float = 1 / 6, reduction: str = "token_mean", mask_padding: bool = True):
        if not 0 < predict_frac <= 1:
            raise ConfigError(f"permutation_lm: predict_frac must be in (0, 1], got {predict_frac}")
        self.predict_frac = float(predict_frac)
        self.mask_id: int | None = None

    def bind(self, tokenizer) -> PermutationLM:
        """Take the [MASK] id from `tokenizer`; a clear error without one."""
        from lmforge.tokenizers.wordpiece import special_id

        self.mask_id = special_id(tokenizer, "mask")
        if self.mask_id is None:
            raise ConfigError("permutation_lm needs a [MASK] token to hide the targets' content, and this "
                              "tokenizer has none; use tokenizer.kind: wordpiece")
        return self

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy at the target positions, each seeing only what precedes it in its order."""
        if self.mask_id is None:
            raise ConfigError("permutation_lm: call bind(tokenizer) first (the run builder does)")
        ids = batch["input_ids"]
        B, T = ids.shape
        gen = None if model.training else torch.Generator(device=ids.device).manual_seed(_content_seed(ids))
        _, targets, visible = permutation_masks(B, T, self.predict_frac, gen, ids.device)
        x = ids.masked_fill(targets, self.mask_id)
        labels = ids.masked_fill(~targets, IGNORE_INDEX)
        logits = model(x, attn_mask=visible)  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        n = targets.sum()
        with torch.no_grad():
            correct = ((logits.argmax(-1) == labels) & targets).sum()
        stats = {"nll": nll.detach().double(), "tokens": n.double(), "correct": correct.double()}
        return add_aux_loss(model, nll / n.clamp(min=1), stats), stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss (per target token), ppl, acc."""
        n = max(totals.get("tokens", 0.0), 1.0)
        per_tok = totals["nll"] / n
        return {"loss": per_tok, "ppl": math.exp(min(per_tok, 700.0)), "acc": totals["correct"] / n}
