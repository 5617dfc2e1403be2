"""Reward model: a sequence-score head on a decoder, trained on preference pairs (Bradley-Terry).

    P(chosen > rejected) = sigmoid(r(x, y_c) - r(x, y_r)),  loss = -log sigmoid(r_c - r_r)

(Bradley & Terry 1952; Ouyang et al. 2022, eq. 1). The score is the head applied to the final hidden
state of a sequence's last token. An optional `center` term (Eisenstein et al. 2023) keeps rewards near
0: + center * mean((r_c + r_r)^2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.align.dpo import _wins
from lmforge.models.scalar_heads import ScalarHead
from lmforge.train.objectives import Batch, Objective, add_aux_loss


def rewards(model: nn.Module, head: ScalarHead, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) rewards of full sequences (B, T) (prompt + response), right-padded per `attention_mask`."""
    return head.sequence_scores(model.hidden_states(input_ids), attention_mask)


class RewardObjective(Objective):
    """Bradley-Terry loss of a reward head on preference batches (chosen rows, then rejected rows).

    The reward is read at each sequence's last real token, so the batch's full sequences are scored
    (the last label is appended back onto input_ids). Stats: loss, pairs, correct (r_c > r_r), margin.

    Args:
        d_model: width of the decoder's hidden states (the head's input), or pass `head`.
        center: weight of the reward-centering term (0 = off).
    """

    name = "reward"

    def __init__(self, d_model: int | None = None, head: ScalarHead | None = None, center: float = 0.0):
        if head is None:
            if d_model is None:
                raise ValueError("RewardObjective needs d_model (the model's hidden size) or a head")
            head = ScalarHead(d_model)
        self.head, self.center = head, center

    def modules(self) -> dict[str, nn.Module]:
        """The reward head, trained with the model."""
        return {"reward_head": self.head}

    def scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(2B,) rewards of the batch's rows."""
        ids, mask = full_sequences(batch)
        return rewards(model, self.head, ids, mask)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean -log sigmoid(r_c - r_r) (+ centering)."""
        r = self.scores(model, batch)
        B = r.shape[0] // 2
        r_c, r_r = r[:B], r[B:]
        losses = -F.logsigmoid(r_c - r_r)
        loss = losses.mean()
        if self.center:
            loss = loss + self.center * ((r_c + r_r) ** 2).mean()
        stats = {"loss": losses.detach().sum().double(), "pairs": torch.tensor(float(B), dtype=torch.float64),
                 "correct": _wins(r_c.detach(), r_r.detach()), "margin": (r_c - r_r).detach().sum().double()}
        return add_aux_loss(model, loss, stats), stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss (Bradley-Terry), acc (preference accuracy), margin (mean r_c - r_r)."""
        n = max(totals.get("pairs", 0.0), 1.0)
        return {"loss": totals["loss"] / n, "acc": totals["correct"] / n, "margin": totals["margin"] / n}


def full_sequences(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's whole sequences (N, T + 1) and their attention mask: inputs plus the last label."""
    ids = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    lens = batch.get("lengths")
    if lens is None:
        return ids, None
    return ids, (torch.arange(ids.shape[1], device=ids.device)[None] < lens[:, None]).long()


class RewardModel:
    """A trained reward model (decoder + head) that scores texts: `rm.score(prompt, response)`.

    Load one with `RewardModel.load(folder)` from a model folder that holds `heads.safetensors`.
    """

    def __init__(self, llm, head: ScalarHead):
        self.llm, self.head = llm, head.eval()

    @classmethod
    def load(cls, folder: str | Path) -> RewardModel:
        """The decoder and its reward head from a model folder written by `lmforge align --method reward`."""
        from lmforge.llm import load
        from lmforge.train.checkpoint import load_heads

        llm = load(folder)
        head = ScalarHead(llm.config.d_model)
        sd = {k.removeprefix("reward_head."): v for k, v in load_heads(folder).items() if k.startswith("reward_head.")}
        head.load_state_dict(sd)
        return cls(llm, head)

    @torch.no_grad()
    def score_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """(N,) rewards of token sequences."""
        T = max(len(x) for x in ids)
        x = torch.zeros((len(ids), T), dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, s in enumerate(ids):
            x[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return rewards(self.llm.model, self.head, x, mask)
