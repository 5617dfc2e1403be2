"""Knowledge distillation: a smaller student learns a teacher's output distribution (same tokenizer).

Per target position, with teacher logits z_t, student logits z_s and temperature T (Hinton et al. 2015):

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
         + (1 - alpha) * CE(z_s, next token)
         + hidden_weight * MSE(P h_s, h_t)       (optional; Sanh et al. 2019's cosine/MSE hidden loss)

T^2 keeps the soft-target gradients on the scale of the hard ones. h_s, h_t are the final hidden states;
P is a learned linear map when the student is narrower (Jiao et al. 2020, TinyBERT), else the identity.
The teacher runs without gradients in eval mode; `student_from_teacher` starts the student from every
k-th teacher layer (DistilBERT's initialisation), so it begins close to the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import DecoderLM
from lmforge.train.objectives import Batch, Objective, add_aux_loss


class Distill(Objective):
    """Distillation objective of the one trainer; the model trained is the student.

    Args:
        teacher: the frozen teacher `DecoderLM` (same vocabulary as the student).
        temperature: softening of both distributions (> 0).
        alpha: weight of the soft (KL) term; 1 - alpha weighs the hard next-token loss.
        hidden_weight: weight of the hidden-state MSE (0 = off).
        student_dim: the student's hidden size, when hidden_weight > 0 and it differs from the teacher's.

    Stats: kl, nll (summed over counted targets), tokens, correct (student top-1 = label), agree (student
    top-1 = teacher top-1), hidden (summed MSE per token). Summaries: loss, kl, ppl, acc, agreement.
    """

    name = "distill"

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5, hidden_weight: float = 0.0,
                 student_dim: int | None = None):
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.T, self.alpha, self.hidden_weight = temperature, alpha, hidden_weight
        t_dim = teacher.config.d_model
        self.proj = None
        if hidden_weight > 0 and student_dim is not None and student_dim != t_dim:
            self.proj = nn.Linear(student_dim, t_dim, bias=False)

    def modules(self) -> dict[str, nn.Module]:
        """The hidden-state projection (when the student is narrower), trained with the student."""
        return {"hidden_proj": self.proj} if self.proj is not None else {}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Soft KL + hard CE (+ hidden MSE), averaged over counted target tokens."""
        x, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("loss_mask")
        mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
        with torch.no_grad():
            h_t = self.teacher.hidden_states(x)
            z_t = self.teacher.lm_head(h_t).float()
        h_s = model.hidden_states(x)
        z_s = model.lm_head(h_s).float()
        if z_s.shape[-1] != z_t.shape[-1]:
            raise ConfigError(f"student vocabulary ({z_s.shape[-1]}) differs from the teacher's ({z_t.shape[-1]}); "
                              "distillation needs one tokenizer")
        n = mask.sum().clamp(min=1)
        log_p_t = F.log_softmax(z_t / self.T, -1)
        log_p_s = F.log_softmax(z_s / self.T, -1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, T)
        kl_sum = (kl * mask).sum()
        nll = F.cross_entropy(z_s.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        nll_sum = (nll * mask).sum()
        loss = (self.alpha * self.T ** 2 * kl_sum + (1 - self.alpha) * nll_sum) / n
        hid = torch.zeros((), dtype=torch.float64)
        if self.hidden_weight > 0:
            hs = self.proj(h_s) if self.proj is not None else h_s
            if hs.shape[-1] != h_t.shape[-1]:
                raise ConfigError("hidden-state matching needs student_dim when the student is narrower")
            mse = ((hs.float() - h_t.float()) ** 2).mean(-1)
            hsum = (mse * mask).sum()
            loss = loss + self.hidden_weight * hsum / n
            hid = hsum.detach().double()
        with torch.no_grad():
            top_s = z_s.argmax(-1)
            stats = {"kl": kl_sum.detach().double(), "nll": nll_sum.detach().double(), "tokens": n.double(),
                     "correct": ((top_s == labels) & mask).sum().double(),
                     "agree": ((top_s == z_t.argmax(-1)) & mask).sum().double(), "hidden": hid,
                     "loss": loss.detach().double() * n.double()}
        return add_aux_loss(model, loss, stats), stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss, kl (per token, at temperature T), ppl (student, hard labels), acc, agreement (with the teacher)."""
        import math

        n = max(totals.get("tokens", 0.0), 1.0)
        nll = totals["nll"] / n
        return {"loss": totals["loss"] / n, "kl": totals["kl"] / n, "nll_per_token": nll,
                "ppl": math.exp(min(nll, 700.0)), "acc": totals["correct"] / n, "agreement": totals["agree"] / n,
                "hidden_mse": totals.get("hidden", 0.0) / n}


def student_from_teacher(teacher: DecoderLM, n_layer: int | None = None, **overrides) -> DecoderLM:
    """A student with the teacher's config but `n_layer` layers (and any other `Config.replace` overrides).

    With only the depth changed, the student starts from evenly spaced teacher layers (first and last
    included) and the teacher's embeddings, final norm and head; otherwise it is freshly initialised.
    """
    cfg = teacher.config
    n_layer = n_layer or cfg.n_layer
    if not 1 <= n_layer <= cfg.n_layer:
        raise ConfigError(f"the student needs 1..{cfg.n_layer} layers (the teacher's depth), got {n_layer}")
    scfg = cfg.replace(n_layer=n_layer, **overrides)
    if scfg.vocab_size != cfg.vocab_size:
        raise ConfigError("the student must keep the teacher's vocabulary (one tokenizer)")
    student = DecoderLM(scfg).to(teacher.tok_emb.weight.device)
    if overrides:
        return student
    picks = [0] if n_layer == 1 else [round(i * (cfg.n_layer - 1) / (n_layer - 1)) for i in range(n_layer)]
    sd = teacher.state_dict()
    new = {}
    for k in student.state_dict():
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            new[k] = sd[f"blocks.{picks[int(i)]}.{rest}"]
        else:
            new[k] = sd[k]
    student.load_state_dict(new)
    return student
