"""T5's span corruption (Raffel et al. 2020, section 3.1.4 and 3.3.4): drop random spans from a text, put a
sentinel in each gap, and train an encoder-decoder to produce the dropped spans after their sentinels.

    input:  Thank you <extra_id_0> me to your party <extra_id_1> week </s>
    target: <extra_id_0> for inviting <extra_id_1> last </s>

Of a window of T tokens, n = round(T * noise_density) are noise, in k = round(n / mean_span_length) spans
(T5: density 0.15, mean span 3). The noise and the clean tokens are each cut into k runs of random positive
lengths (uniform over the compositions) and interleaved, clean first, as T5's `random_spans_noise_mask`
does; every row of a batch then has the same input and target lengths, so batches need no padding.

Masks come from torch's global RNG while training (the trainer checkpoints it, so a resumed run draws the
same ones) and from a generator seeded by the batch's content during evaluation, so validation loss is
comparable between evaluations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.masked import _content_seed
from lmforge.train.objectives import Batch, Objective, add_aux_loss


def span_counts(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) for a window of `length` tokens."""
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(min(round(n_noise / mean_span_length), n_noise, length - n_noise), 1)
    return n_noise, n_spans


def _composition(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k positive integers summing to n, uniform over all such compositions."""
    cuts = (torch.randperm(n - 1, generator=generator)[: k - 1] + 1).sort().values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))


def noise_mask(batch: int, length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, length) bool, True at noise tokens: per row the same counts, spans placed at random."""
    n_noise, n_spans = span_counts(length, noise_density, mean_span_length)
    rows = []
    for _ in range(batch):
        noise = _composition(n_noise, n_spans, generator)
        clean = _composition(length - n_noise, n_spans, generator)
        runs = torch.stack([clean, noise], 1).flatten()  # clean_0, noise_0, clean_1, noise_1, ...
        flags = torch.tensor([False, True]).repeat(n_spans)
        rows.append(flags.repeat_interleave(runs))
    return torch.stack(rows)


def corrupt_spans(ids: torch.Tensor, noise: torch.Tensor, sentinels: torch.Tensor,
                  eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder input, target) for ids (B, T) and a noise mask with the same count of spans in every row.

    Each noise span becomes one sentinel in the input; the target lists each span after its sentinel.
    `sentinels`: ids of <extra_id_0>, <extra_id_1>, ...; `eos_id` (if any) ends both sequences.
    """
    B = ids.shape[0]
    sentinels = sentinels.to(ids.device)

    def squeeze(drop: torch.Tensor) -> torch.Tensor:
        # runs of `drop` positions collapse into one sentinel each, numbered from 0 in every row
        prev = F.pad(drop[:, :-1], (1, 0), value=False)
        first = drop & ~prev
        tokens = torch.where(first, sentinels[(first.long().cumsum(1) - 1).clamp(min=0)], ids)
        out = tokens[~drop | first].view(B, -1)
        if eos_id is not None:
            out = F.pad(out, (0, 1), value=eos_id)
        return out

    # the target is the same operation on the clean runs: clean run j (before noise span j) -> <extra_id_j>
    return squeeze(noise), squeeze(~noise)


class SpanCorruption(Objective):
    """T5's span-corruption loss: cross-entropy of the target (sentinels + dropped spans + EOS) given the
    corrupted input, on an `EncoderDecoderLM`.

    Args:
        noise_density: share of tokens dropped (T5: 0.15).
        mean_span_length: average length of a dropped span (T5: 3).
        reduction, mask_padding: accepted for the recipe's common options; the loss averages over target tokens.

    Needs the tokenizer (`bind`, done by the run builder) for the sentinel ids and EOS. Batches: input_ids (B, T),
    windows of clean text. Stats: nll, tokens (targets), correct, noise, spans, window (tokens before corruption).
    """

    name = "span_corruption"

    def __init__(self, noise_density: float = 0.15, mean_span_length: float = 3.0, reduction: str = "token_mean",
                 mask_padding: bool = True):
        if not 0 < noise_density < 1:
            raise ConfigError(f"span_corruption: noise_density must be in (0, 1), got {noise_density}")
        if not mean_span_length >= 1:
            raise ConfigError(f"span_corruption: mean_span_length must be >= 1, got {mean_span_length}")
        self.noise_density, self.mean_span_length = float(noise_density), float(mean_span_length)
        self.sentinels: torch.Tensor | None = None
        self.eos_id: int | None = None

    def bind(self, tokenizer) -> SpanCorruption:
        """Take the <extra_id_N> sentinels and EOS from `tokenizer`; a clear error when it has no sentinels."""
        from lmforge.tokenizers.unigram import sentinel_ids

        ids = sentinel_ids(tokenizer)
        if not ids:
            raise ConfigError("span_corruption needs <extra_id_0>, <extra_id_1>, ... sentinel tokens, and this "
                              "tokenizer has none; use tokenizer.kind: unigram (trains T5-style sentinels) or a "
                              "T5 tokenizer")
        self.sentinels, self.eos_id = torch.tensor(ids), tokenizer.eos_id
        return self

    def corrupt(self, ids: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder input, target, noise mask) for clean windows ids (B, T)."""
        if self.sentinels is None:
            raise ConfigError("span_corruption: call bind(tokenizer) first (the run builder does)")
        B, T = ids.shape
        n_spans = span_counts(T, self.noise_density, self.mean_span_length)[1]
        if n_spans > len(self.sentinels):
            raise ConfigError(f"span_corruption: a window of {T} tokens has {n_spans} spans but the tokenizer has "
                              f"only {len(self.sentinels)} sentinels; use shorter windows (train.seq_len) or a "
                              "tokenizer with more <extra_id_N> tokens (tokenizer.sentinels)")
        noise = noise_mask(B, T, self.noise_density, self.mean_span_length, generator).to(ids.device)
        src, tgt = corrupt_spans(ids, noise, self.sentinels, self.eos_id)
        return src, tgt, noise

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy over the target of a freshly corrupted batch (teacher forcing)."""
        inner = getattr(getattr(model, "_orig_mod", model), "module", getattr(model, "_orig_mod", model))
        cfg = inner.config
        if not cfg.is_encoder_decoder:
            raise ConfigError(f"span_corruption trains an encoder-decoder, and {cfg.name!r} is not one; use "
                              "model.preset: tiny-t5 or t5-small")
        ids = batch["input_ids"]
        gen = None if model.training else torch.Generator().manual_seed(_content_seed(ids))
        src, tgt, noise = self.corrupt(ids, gen)
        start = cfg.decoder_start_id if cfg.decoder_start_id is not None else (cfg.pad_id or 0)
        dec_in = F.pad(tgt[:, :-1], (1, 0), value=start)  # teacher forcing: the target shifted right
        logits = model(src, decoder_input_ids=dec_in)  # (B, T_tgt, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum")
        n = tgt.numel()
        with torch.no_grad():
            correct = (logits.argmax(-1) == tgt).sum()
        spans = (noise & ~F.pad(noise[:, :-1], (1, 0), value=False)).sum()
        f64 = dict(dtype=torch.float64)
        stats = {"nll": nll.detach().double(), "tokens": torch.tensor(float(n), **f64), "correct": correct.double(),
                 "noise": noise.sum().double(), "spans": spans.double(),
                 "window": torch.tensor(float(ids.numel()), **f64)}
        return add_aux_loss(model, nll / n, stats), stats

    def tokens(self, batch: Batch) -> int:
        return int(batch["input_ids"].numel())

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss (per target token), ppl, acc, noise_frac (dropped share) and mean_span (tokens per span)."""
        n = max(totals.get("tokens", 0.0), 1.0)
        per_tok = totals["nll"] / n
        out = {"loss": per_tok, "ppl": math.exp(min(per_tok, 700.0)), "acc": totals["correct"] / n,
               "noise_frac": totals["noise"] / max(totals["window"], 1.0),
               "mean_span": totals["noise"] / max(totals["spans"], 1.0)}
        if totals.get("aux_batches"):
            out["aux_loss"] = totals["aux_loss"] / totals["aux_batches"]
        return out
