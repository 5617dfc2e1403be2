"""Masked language modelling (BERT): corrupt a share of the input, predict the original tokens there.

    ell_masked(theta) = -E_x E_M [ sum_{m in M} ln p_theta(x_m | x_{-M}) ]        (Devlin et al. 2019)

Each position that is not a special token is selected with probability `mask_prob` (15%); a selected
token is replaced by [MASK] with probability 0.8, by a token drawn uniformly from the vocabulary with
0.1, and kept with 0.1 (`replace`). With `whole_word`, selection is per word: every piece of a chosen
word is selected (WordPiece "##" continuations, or byte-level BPE pieces without a leading "Ġ").

Masks are drawn from torch's global RNG while training (so they change every time a window is seen,
RoBERTa's dynamic masking, and a resumed run draws the same ones: the trainer checkpoints that RNG), and
from a generator seeded by the batch's content during evaluation, so validation loss is comparable
between evaluations and touches no training RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.objectives import IGNORE_INDEX, Batch, Objective, add_aux_loss


def continuation_table(tokenizer) -> torch.Tensor:
    """(vocab,) bool: True for tokens that continue a word (WordPiece "##x"; byte-level BPE without "Ġ")."""
    n = tokenizer.vocab_size
    toks = [tokenizer.id_to_token(i) or "" for i in range(n)]
    specials = set(tokenizer.special_tokens.values())
    if any(t.startswith("##") for t in toks):
        cont = [t.startswith("##") for t in toks]
    elif any(t.startswith("Ġ") for t in toks):
        cont = [not t.startswith("Ġ") and len(t) > 0 and t[0].isalnum() for t in toks]
    else:
        raise ConfigError("whole_word masking needs a WordPiece (##) or byte-level BPE (Ġ) vocabulary; this "
                          "tokenizer marks no word boundaries. Set whole_word: false")
    return torch.tensor([c and i not in specials for i, c in enumerate(cont)], dtype=torch.bool)


def mask_tokens(ids: torch.Tensor, *, mask_id: int, vocab_size: int, mask_prob: float = 0.15,
                replace: tuple[float, float, float] = (0.8, 0.1, 0.1), maskable: torch.Tensor | None = None,
                continuation: torch.Tensor | None = None, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted ids, labels) for ids (B, T); labels hold the original token where selected, else -100.

    maskable: (B, T) bool, positions that may be selected (not special, not padding); continuation: the
    `continuation_table`, for whole-word selection.
    """
    B, T = ids.shape
    g = dict(generator=generator, device=ids.device)
    if continuation is None:
        selected = torch.rand(B, T, **g) < mask_prob
    else:  # one draw per word, shared by its pieces
        starts = ~continuation.to(ids.device)[ids]  # (B, T)
        word = (starts.long().cumsum(1) - 1).clamp(min=0)  # word index of each token
        selected = (torch.rand(B, T, **g) < mask_prob).gather(1, word)
    if maskable is not None:
        selected &= maskable
    r = torch.rand(B, T, **g)
    to_mask = selected & (r < replace[0])
    to_random = selected & (r >= replace[0]) & (r < replace[0] + replace[1])
    random_ids = torch.randint(0, vocab_size, (B, T), **g)
    corrupted = torch.where(to_mask, torch.full_like(ids, mask_id), torch.where(to_random, random_ids, ids))
    return corrupted, ids.masked_fill(~selected, IGNORE_INDEX)


def _content_seed(ids: torch.Tensor) -> int:
    flat = ids.flatten()[:8192].long()
    w = torch.arange(1, flat.numel() + 1, dtype=torch.long, device=ids.device)
    return int((flat * w).sum().item()) % (2**62)


class MaskedLM(Objective):
    """BERT's masked-LM loss: cross-entropy on the selected positions only.

    Args:
        mask_prob: share of (non-special) tokens selected.
        replace: probabilities of [MASK] / random token / unchanged for a selected token.
        whole_word: select whole words rather than pieces.
        reduction, mask_padding: accepted for the recipe's common options; MLM averages over selected tokens.

    Needs the tokenizer (`bind(tokenizer)`, done by the run builder) for the [MASK] id, the special tokens
    and, with `whole_word`, the word boundaries. Batches: input_ids (B, T), optional attention_mask /
    loss_mask (B, T) (False at padding) and token_type_ids.
    Stats: nll, tokens (selected), correct, candidates, masked ([MASK]), randomized, kept.
    """

    name = "masked_lm"

    def __init__(self, mask_prob: float = 0.15, replace: tuple[float, float, float] | list[float] = (0.8, 0.1, 0.1),
                 whole_word: bool = False, reduction: str = "token_mean", mask_padding: bool = True):
        replace = tuple(float(x) for x in replace)
        if not 0 < mask_prob < 1:
            raise ConfigError(f"masked_lm: mask_prob must be in (0, 1), got {mask_prob}")
        if len(replace) != 3 or min(replace) < 0 or abs(sum(replace) - 1) > 1e-6:
            raise ConfigError(f"masked_lm: replace must be three probabilities ([MASK], random, keep) summing to 1, "
                              f"got {list(replace)}")
        self.mask_prob, self.replace, self.whole_word = float(mask_prob), replace, whole_word
        self.mask_id: int | None = None

    def bind(self, tokenizer) -> MaskedLM:
        """Take the [MASK] id, special tokens and word boundaries from `tokenizer`; a clear error without [MASK]."""
        from lmforge.tokenizers.wordpiece import special_id

        mask_id = special_id(tokenizer, "mask")
        if mask_id is None:
            raise ConfigError("masked_lm needs a [MASK] token, and this tokenizer's vocabulary has none; use "
                              "tokenizer.kind: wordpiece (trains one with [MASK]) or a BERT/RoBERTa tokenizer")
        self.mask_id, self.vocab_size = mask_id, tokenizer.vocab_size
        self.special = torch.tensor(sorted(set(tokenizer.special_tokens.values())), dtype=torch.long)
        self.continuation = continuation_table(tokenizer) if self.whole_word else None
        return self

    def corrupt(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupted input_ids, labels) for a batch."""
        if self.mask_id is None:
            raise ConfigError("masked_lm: call bind(tokenizer) first (the run builder does)")
        ids = batch["input_ids"]
        maskable = ~torch.isin(ids, self.special.to(ids.device))
        pad = batch.get("attention_mask", batch.get("loss_mask"))
        if pad is not None:
            maskable &= pad.bool()
        return mask_tokens(ids, mask_id=self.mask_id, vocab_size=self.vocab_size, mask_prob=self.mask_prob,
                           replace=self.replace, maskable=maskable, continuation=self.continuation,
                           generator=generator)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy at the selected positions of the corrupted batch."""
        gen = None if model.training else torch.Generator(device=batch["input_ids"].device).manual_seed(
            _content_seed(batch["input_ids"]))
        x, labels = self.corrupt(batch, gen)
        kwargs = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
        logits = model(x, **kwargs)  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        sel = labels != IGNORE_INDEX
        n = sel.sum()
        loss = nll / n.clamp(min=1)
        ids = batch["input_ids"]
        with torch.no_grad():
            correct = ((logits.argmax(-1) == labels) & sel).sum()
            stats = {"nll": nll.detach().double(), "tokens": n.double(), "correct": correct.double(),
                     "masked": ((x == self.mask_id) & sel).sum().double(),
                     "kept": ((x == ids) & sel).sum().double(),
                     "candidates": (~torch.isin(ids, self.special.to(ids.device))).sum().double()}
        return add_aux_loss(model, loss, stats), stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss (per selected token), ppl, acc, and the share of tokens selected / replaced by [MASK]."""
        n = max(totals.get("tokens", 0.0), 1.0)
        per_tok = totals["nll"] / n
        out = {"loss": per_tok, "ppl": math.exp(min(per_tok, 700.0)), "acc": totals["correct"] / n,
               "selected_frac": n / max(totals.get("candidates", 0.0), 1.0), "mask_frac": totals["masked"] / n}
        if totals.get("aux_batches"):
            out["aux_loss"] = totals["aux_loss"] / totals["aux_batches"]
        return out


class CombinedLM(MaskedLM):
    """The seed's penalised objective on a decoder: ell_alpha = ell + alpha * ell_masked (Tomczak, "LLMs";
    Dong et al. 2019, UniLM; alpha = 1 in Izdebski et al. 2023).

    ell is the next-token NLL of the clean batch; ell_masked is computed on a second, corrupted copy (BERT's
    15% / 80-10-10 masking), predicting each selected token at its own position. The decoder keeps its
    causal attention for that pass, so x_m is reconstructed from the corrupted prefix and the corrupted
    token at m: a single-stream approximation of UniLM, whose masked segment attends bidirectionally.

    Args: alpha (weight of the masked term), then `MaskedLM`'s and `CausalLM`'s options.
    Summaries: loss (ell + alpha * ell_masked), lm_loss / ppl / acc (causal), mlm_loss / mlm_acc.
    """

    name = "combined_lm"

    def __init__(self, alpha: float = 1.0, mask_prob: float = 0.15,
                 replace: tuple[float, float, float] | list[float] = (0.8, 0.1, 0.1), whole_word: bool = False,
                 reduction: str = "token_mean", mask_padding: bool = True):
        from lmforge.train.objectives import CausalLM

        if alpha < 0:
            raise ConfigError(f"combined_lm: alpha must be >= 0, got {alpha}")
        super().__init__(mask_prob, replace, whole_word)
        self.alpha = float(alpha)
        self.causal = CausalLM(reduction, mask_padding)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ell on the clean batch plus alpha times ell_masked on a corrupted copy."""
        lm, lm_stats = self.causal.loss(model, batch)
        mlm, mlm_stats = super().loss(model, batch)
        stats = {**{f"lm_{k}": v for k, v in lm_stats.items()}, **{f"mlm_{k}": v for k, v in mlm_stats.items()}}
        return lm + self.alpha * mlm, stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """Both terms and their weighted sum."""
        a = self.causal.summarize({k[3:]: v for k, v in totals.items() if k.startswith("lm_")})
        b = super().summarize({k[4:]: v for k, v in totals.items() if k.startswith("mlm_")})
        return {"loss": a["loss"] + self.alpha * b["loss"], "lm_loss": a["loss"], "ppl": a["ppl"], "acc": a["acc"],
                "mlm_loss": b["loss"], "mlm_acc": b["acc"], "selected_frac": b["selected_frac"]}
