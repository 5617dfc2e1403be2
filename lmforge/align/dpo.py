"""Direct preference optimisation and its variants, as `Objective`s of the one trainer.

With policy log-probs pi_c, pi_r of the chosen / rejected response (summed over response tokens),
reference log-probs ref_c, ref_r and response lengths n_c, n_r:

- DPO (Rafailov et al. 2023, eq. 7):  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
- IPO (Azar et al. 2023, eq. 17):     ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2
  (per-token log-ratios, as trl computes it and the IPO authors confirmed)
- SimPO (Meng et al. 2024, eq. 6):    -log sigmoid(beta * (pi_c / n_c - pi_r / n_r) - gamma); no reference
- ORPO (Hong et al. 2024, eq. 6-7):   NLL(chosen) / n_c + lam * -log sigmoid(log odds(c) - log odds(r)),
  odds(y) = p / (1 - p) with p = exp(pi / n); no reference

The reference is the policy with its LoRA adapters switched off (`logps.Reference`), so one model is
in memory; a separate frozen model can be given for full fine-tuning.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.align.logps import Reference, sequence_logps
from lmforge.errors import ConfigError
from lmforge.train.objectives import Batch, Objective, add_aux_loss

LossType = Literal["dpo", "ipo", "simpo", "orpo"]
REFERENCE_FREE = ("simpo", "orpo")


def preference_loss(loss_type: LossType, pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor | None,
                    ref_r: torch.Tensor | None, n_c: torch.Tensor, n_r: torch.Tensor, beta: float,
                    gamma: float = 0.0, lam: float = 0.1, label_smoothing: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of chosen and rejected (B,), (B,).

    All inputs are (B,) tensors: summed response log-probs (policy and reference) and response lengths.
    """
    n_c, n_r = n_c.clamp(min=1).to(pi_c.dtype), n_r.clamp(min=1).to(pi_c.dtype)
    if loss_type in ("dpo", "ipo"):
        if ref_c is None or ref_r is None:
            raise ConfigError(f"{loss_type} needs reference log-probs")
        lr_c, lr_r = pi_c - ref_c, pi_r - ref_r
        if loss_type == "dpo":
            z = beta * (lr_c - lr_r)
            losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        else:
            losses = (lr_c / n_c - lr_r / n_r - 1 / (2 * beta)) ** 2
        return losses, beta * lr_c.detach(), beta * lr_r.detach()
    avg_c, avg_r = pi_c / n_c, pi_r / n_r
    if loss_type == "simpo":
        losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    if loss_type == "orpo":
        # log odds = log p - log(1 - p); log1p(-exp(x)) is accurate for log-probs near 0
        log_odds = (avg_c - torch.log1p(-torch.exp(avg_c).clamp(max=1 - 1e-6))) - \
                   (avg_r - torch.log1p(-torch.exp(avg_r).clamp(max=1 - 1e-6)))
        losses = -avg_c - lam * F.logsigmoid(log_odds)
        return losses, lam * avg_c.detach(), lam * avg_r.detach()
    raise ConfigError(f"unknown preference loss {loss_type!r}; choose one of dpo, ipo, simpo, orpo")


class DPO(Objective):
    """Preference optimisation (DPO / IPO / SimPO / ORPO) on batches of chosen + rejected sequences.

    Args:
        loss_type: dpo | ipo | simpo | orpo.
        beta: strength of the KL-regularisation (dpo, ipo) or reward scale (simpo); 0.1 is usual for DPO.
        gamma: SimPO's target reward margin.
        lam: ORPO's weight of the odds-ratio term.
        label_smoothing: conservative DPO (assumed label-noise rate), 0 = plain DPO.
        reference: a frozen reference model; None = the policy with its LoRA adapters off.

    Batches: see `lmforge.align.logps` (chosen rows first, then rejected); an optional `ref_logps` (2B,)
    entry holds precomputed reference log-probs. Stats: loss (summed), pairs, correct (chosen reward >
    rejected reward), margin, chosen, rejected (reward sums). Summaries: loss, acc (preference
    accuracy; a tie counts half), margin, reward_chosen, reward_rejected.
    """

    name = "dpo"

    def __init__(self, loss_type: LossType = "dpo", beta: float = 0.1, gamma: float = 0.5, lam: float = 0.1,
                 label_smoothing: float = 0.0, reference: nn.Module | None = None):
        if loss_type not in ("dpo", "ipo", "simpo", "orpo"):
            raise ConfigError(f"unknown preference loss {loss_type!r}; choose one of dpo, ipo, simpo, orpo")
        if beta <= 0:
            raise ConfigError(f"beta must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.loss_type, self.beta, self.gamma, self.lam = loss_type, beta, gamma, lam
        self.label_smoothing = label_smoothing
        self.reference = Reference(reference)
        self.name = loss_type

    def reference_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """(2B,) reference log-probs of every row (None for the reference-free losses)."""
        if self.loss_type in REFERENCE_FREE:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return self.reference.logps(model, batch)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean preference loss over the batch's pairs."""
        ref = self.reference_logps(model, batch)
        logps, lengths = sequence_logps(model, batch)
        B = logps.shape[0] // 2
        pi_c, pi_r = logps[:B], logps[B:]
        ref_c, ref_r = (ref[:B], ref[B:]) if ref is not None else (None, None)
        losses, r_c, r_r = preference_loss(self.loss_type, pi_c, pi_r, ref_c, ref_r, lengths[:B], lengths[B:],
                                           self.beta, self.gamma, self.lam, self.label_smoothing)
        stats = {"loss": losses.detach().sum().double(), "pairs": torch.tensor(float(B), dtype=torch.float64),
                 "correct": _wins(r_c, r_r), "margin": (r_c - r_r).sum().double(),
                 "chosen": r_c.sum().double(), "rejected": r_r.sum().double()}
        return add_aux_loss(model, losses.mean(), stats), stats  # MoE balance loss, if any

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss, acc (preference accuracy), margin, reward_chosen, reward_rejected (means per pair)."""
        n = max(totals.get("pairs", 0.0), 1.0)
        return {"loss": totals["loss"] / n, "acc": totals["correct"] / n, "margin": totals["margin"] / n,
                "reward_chosen": totals["chosen"] / n, "reward_rejected": totals["rejected"] / n}


def _wins(r_c: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
    """Pairs whose chosen reward is higher, a tie counting half (at the start of LoRA training every
    implicit reward is exactly 0: that is chance, 0.5, not 0)."""
    return ((r_c > r_r).double() + 0.5 * (r_c == r_r).double()).sum()


class IPO(DPO):
    """`DPO(loss_type="ipo")`: identity preference optimisation (squared per-token log-ratio margin)."""

    def __init__(self, **kwargs):
        super().__init__(loss_type="ipo", **kwargs)


class SimPO(DPO):
    """`DPO(loss_type="simpo")`: reference-free, length-normalised, with a target margin gamma."""

    def __init__(self, beta: float = 2.0, **kwargs):
        super().__init__(loss_type="simpo", beta=beta, **kwargs)


class ORPO(DPO):
    """`DPO(loss_type="orpo")`: SFT on chosen plus an odds-ratio penalty; reference-free."""

    def __init__(self, **kwargs):
        super().__init__(loss_type="orpo", **kwargs)
