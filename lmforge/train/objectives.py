"""Training objectives: what the one loop minimises, as a pluggable component.

An `Objective` turns (model, batch) into a scalar loss plus summable statistics. The trainer knows
nothing else about it, so masked LM, SFT, DPO or a reward model plug into the same loop by adding an
`Objective` (and a batch source producing the dicts it reads), never a copy of the loop.

Batches are dicts of tensors. The causal-LM objectives read:
    input_ids: (B, T) token ids fed to the model
    labels:    (B, T) the next token at each position (already shifted)
    loss_mask: (B, T) bool, optional; False where a target is padding and must not count
    segment_ids: (B, T) long, optional; packed rows (several examples per row), passed to the model
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

Batch = dict[str, torch.Tensor]


class Objective:
    """Base class: `loss(model, batch) -> (loss, stats)`.

    `loss` is what backward() is called on (already averaged as the objective defines it). `stats` are
    0-d float tensors that add up across batches (sums and counts, never means), so evaluation over
    many batches is exact; `summarize(stats)` turns the totals into reportable metrics, `"loss"` among
    them computed the same way as the training loss.
    """

    name = "objective"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and summable statistics for one (micro-)batch."""
        raise NotImplementedError

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """Metrics (loss, and whatever else the objective reports) from summed statistics."""
        raise NotImplementedError

    def tokens(self, batch: Batch) -> int:
        """Tokens the model processes for this batch (for tokens/s and MFU)."""
        return int(batch["input_ids"].numel())

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules the objective owns besides the model (a reward or value head): the trainer
        optimises them with the model and saves them beside its weights (`heads.safetensors`)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the objective carries from one batch to the next (Transformer-XL's memory), which a
        resumed run needs to continue bit-identically; the trainer saves them in each checkpoint
        (`objective.pt`). Most objectives carry nothing."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what `state_dict` returned (on resume, before the first batch)."""


def add_aux_loss(model: nn.Module, loss: torch.Tensor, stats: dict[str, torch.Tensor], weight: float = 1.0
                 ) -> torch.Tensor:
    """`loss` plus the model's auxiliary loss from its last forward (MoE load balancing + router z-loss).

    Any objective calls this right after its forward pass; a model without one (no MoE layer) returns
    `loss` unchanged. Adds summable stats `aux_loss` (x weight) and `moe_dropped` (assignments over capacity).
    """
    inner = unwrap(model)
    fn = getattr(inner, "aux_loss", None)
    aux = fn() if callable(fn) else None
    if aux is None:
        return loss
    stats["aux_loss"] = aux.detach().double() * weight
    stats["aux_batches"] = torch.tensor(weight, dtype=torch.float64)
    dropped = inner.moe_stats().get("dropped")
    if dropped is not None:
        stats["moe_dropped"] = dropped.double()
    return loss + aux.to(loss.dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a torch.compile and/or DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)


def accepts_targets(model: nn.Module) -> bool:
    """Whether `model(input_ids, targets=labels)` returns per-token (nll, hit) (see `DecoderLM.forward`)."""
    return bool(getattr(unwrap(model), "accepts_targets", False))


class CausalLM(Objective):
    """Next-token cross-entropy.

    Args:
        reduction: "token_mean" averages the NLL over counted target tokens (the usual LM loss);
            "sequence_sum" sums it over each sequence's positions and averages over the batch, in nats
            per sequence (teenyGPT's seed reports this).
        mask_padding: when True, targets where `loss_mask` is False (padding) are ignored
            (`ignore_index`); when False every position counts, padding included (the seed's loss).

    Stats: nll (summed over counted targets), tokens (counted targets), correct (top-1 hits among them),
    sequences. Summaries: loss, ppl = exp(nll / tokens), acc = correct / tokens, nll_per_token.
    """

    name = "causal_lm"

    def __init__(self, reduction: Literal["token_mean", "sequence_sum"] = "token_mean", mask_padding: bool = True):
        if reduction not in ("token_mean", "sequence_sum"):
            raise ValueError(f"reduction must be 'token_mean' or 'sequence_sum', got {reduction!r}")
        self.reduction = reduction
        self.mask_padding = mask_padding

    def targets(self, batch: Batch) -> torch.Tensor:
        """Labels with uncounted positions set to IGNORE_INDEX."""
        labels = batch["labels"]
        mask = batch.get("loss_mask")
        if self.mask_padding and mask is not None:
            labels = labels.masked_fill(~mask.bool(), IGNORE_INDEX)
        return labels

    def forward(self, model: nn.Module, batch: Batch, **kwargs):
        """`model(input_ids, **kwargs)` for the batch; packed rows keep attention within each example."""
        seg = batch.get("segment_ids")
        if seg is not None:
            kwargs["segment_ids"] = seg
        return model(batch["input_ids"], **kwargs)

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's logits (B, T, V) for the batch."""
        return self.forward(model, batch)

    def token_nll(self, model: nn.Module, batch: Batch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, hit), each (B, T): fp32 NLL of `labels` (0 where IGNORE_INDEX) and argmax == label.

        A model that takes `targets` (`DecoderLM`) computes them through its LM head in row chunks
        (`lmforge.models.linear_ce`), never holding the (B, T, V) logits, their log-softmax or their
        gradient; the call still goes through `model(...)`, so DDP and FSDP wrappers see it. Other models
        give logits and the loss is taken from them.
        """
        if accepts_targets(model):
            return self.forward(model, batch, targets=labels)
        logits = self.logits(model, batch)  # (B, T, V)
        # fp32 log-softmax: under bf16 autocast the logits are bf16, whose 8-bit mantissa would round the loss
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(labels)  # (B, T), 0 where ignored
        with torch.no_grad():
            hit = (logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)
        return nll, hit

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of the model's next-token predictions against the (masked) labels."""
        labels = self.targets(batch)  # (B, T)
        B = labels.shape[0]
        nll, hit = self.token_nll(model, batch, labels)
        counted = labels != IGNORE_INDEX
        n_tok = counted.sum()
        total = nll.sum()
        if self.reduction == "token_mean":
            loss = total / n_tok.clamp(min=1)
        else:
            loss = total / B
        stats = {"nll": total.detach().double(), "tokens": n_tok.double(), "correct": hit.sum().double(),
                 "sequences": torch.tensor(float(B), dtype=torch.float64)}
        return add_aux_loss(model, loss, stats), stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss (as trained), nll_per_token, ppl, acc."""
        tokens = max(totals.get("tokens", 0.0), 1.0)
        per_tok = totals["nll"] / tokens
        out = {"loss": per_tok if self.reduction == "token_mean" else totals["nll"] / max(totals["sequences"], 1.0),
               "nll_per_token": per_tok, "ppl": math.exp(min(per_tok, 700.0)), "acc": totals["correct"] / tokens}
        if self.reduction == "sequence_sum":
            out["nll_per_sequence"] = out["loss"]
        if totals.get("aux_batches"):  # MoE: mean auxiliary loss per batch, dropped assignments in total
            out["aux_loss"] = totals["aux_loss"] / totals["aux_batches"]
            out["moe_dropped"] = totals.get("moe_dropped", 0.0)
        return out


# name -> class, or "module:attribute" resolved on first use: packages above train (align) provide
# objectives without train importing them, and without an import cycle.
OBJECTIVES: dict[str, type[Objective] | str] = {
    "causal_lm": CausalLM,
    "dpo": "lmforge.align.dpo:DPO", "ipo": "lmforge.align.dpo:IPO", "simpo": "lmforge.align.dpo:SimPO",
    "orpo": "lmforge.align.dpo:ORPO", "reward": "lmforge.align.reward:RewardObjective",
    "ppo": "lmforge.align.ppo:PPO", "distill": "lmforge.compress.distill:Distill",
    "masked_lm": "lmforge.train.masked:MaskedLM", "combined_lm": "lmforge.train.masked:CombinedLM",
    "permutation_lm": "lmforge.train.permutation:PermutationLM",
    "span_corruption": "lmforge.train.span:SpanCorruption",
    "segment_lm": "lmforge.train.segments:SegmentLM",
    "sequence_classification": "lmforge.train.classify:SequenceClassification",
}


def register_objective(name: str, cls: type[Objective] | str) -> None:
    """Make `build_objective(name)` build `cls` (a class or a "module:Class" string, imported when used)."""
    OBJECTIVES[name] = cls


def build_objective(name: str, **kwargs) -> Objective:
    """An objective by name (`causal_lm`, `dpo`, `reward`, ...), with its keyword options."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    if isinstance(cls, str):
        import importlib

        module, _, attr = cls.partition(":")
        cls = OBJECTIVES[name] = getattr(importlib.import_module(module), attr)
    try:
        return cls(**kwargs)
    except TypeError as e:  # an option the objective does not take (train.objective_args)
        raise ValueError(f"objective {name!r}: {e}; check train.objective_args") from None
