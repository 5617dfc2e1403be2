"""Count-based n-gram language models over token ids: the surveys' starting point, scored like any model.

`NGramLM` is a `torch.nn.Module` that maps (B, T) token ids to (B, T, vocab) log-probabilities, so the
perplexity eval, which takes logits, scores it on the same held-out text as a transformer. Two smoothings:

**Interpolated modified Kneser-Ney** (Kneser & Ney 1995; Chen & Goodman 1998, "An Empirical Study of
Smoothing Techniques for Language Modeling", eq. 17-19). For a context h of k-1 tokens and its suffix h':
    P(w | h) = max(c(hw) - D(c(hw)), 0) / c(h.) + gamma(h) P(w | h')
    gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3 N3+(h.)) / c(h.)
with c the raw count at the highest order and the continuation count N1+(. g) (distinct left
neighbours) at lower orders, N_j(h.) the number of words seen exactly j times (3+: at least 3) after h,
and per-order discounts from the count-of-counts n_j:  Y = n1/(n1 + 2 n2), D_j = j - (j+1) Y n_{j+1}/n_j.
**Absolute-discount backoff** (Ney, Essen & Kneser 1994, in Katz's backoff form): raw counts at every
order, one discount D = n1/(n1 + 2 n2) per order,
    P(w | h) = (c(hw) - D) / c(h.)                      if c(hw) > 0
             = alpha(h) P(w | h'),   alpha(h) = (D N1+(h.) / c(h.)) / (1 - sum_{c(hv)>0} P(v | h'))
Both end in a unigram interpolated with the uniform distribution, so every token has a probability, and
a context never seen falls back to its suffix. Each row sums to 1 (float64, up to rounding). Where data
is too small for a count-of-counts (n_j = 0), a discount falls back to the one before it (0.5 for the
first); every discount is kept within [0.05, j].

Storage: per order k, the sorted n-gram keys (ids as base-vocab digits, int64) and their counts, as
tensors; everything else is derived. `save`/`load` write them to safetensors beside a JSON config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.errors import ConfigError, FormatError

METHODS = ("kneser_ney", "backoff")
MODEL_TYPE = "lmforge-ngram"


@dataclass
class NGramConfig:
    """What an n-gram model is: order, smoothing, vocabulary; `block_size` is only the window the
    perplexity eval uses by default (any window of order - 1 tokens or more scores identically)."""

    order: int = 3
    method: str = "kneser_ney"
    vocab_size: int = 256
    block_size: int = 512
    name: str = "ngram"
    train_tokens: int = 0
    discounts: dict[str, list[float]] = field(default_factory=dict)  # per order, as fitted (for reading)
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    family: str = "ngram"

    def validate(self) -> NGramConfig:
        """Check the fields; raises `ConfigError` naming the fix."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown n-gram method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.order < 1:
            raise ConfigError(f"n-gram order must be at least 1, got {self.order}")
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.order * math.log2(self.vocab_size) >= 63:
            raise ConfigError(f"an order-{self.order} model over {self.vocab_size} tokens needs "
                              f"{self.order * math.log2(self.vocab_size):.0f}-bit keys (> 62); lower the order "
                              "or use a smaller vocabulary")
        return self


def _discounts(counts: np.ndarray, modified: bool) -> list[float]:
    """Discounts from the count-of-counts: [D1, D2, D3+] (modified KN) or [D] (absolute discounting)."""
    n = [int((counts == j).sum()) for j in range(1, 5)]
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] > 0 else 0.5
    if not modified:
        return [min(max(y, 0.05), 0.95)]
    out = []
    for j in range(1, 4):  # D_j = j - (j+1) Y n_{j+1} / n_j, kept in (0, j] when counts are too sparse
        d = j - (j + 1) * y * n[j] / n[j - 1] if n[j - 1] > 0 else (out[-1] if out else 0.5)
        out.append(min(max(d, 0.05), float(j)))
    return out


def ngram_counts(tokens: np.ndarray, order: int, vocab_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sorted unique keys and raw counts of every order 1..`order` in a token stream."""
    t = np.asarray(tokens, dtype=np.int64)
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        raise ConfigError(f"token ids must lie in [0, {vocab_size}); got {t.min()}..{t.max()}: the tokens come "
                          "from another tokenizer than the model's vocabulary")
    out = []
    for k in range(1, order + 1):
        n = t.size - k + 1
        if n <= 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        key = np.zeros(n, np.int64)
        for j in range(k):  # key = sum_j t[i+j] V^(k-1-j)
            key = key * vocab_size + t[j:j + n]
        out.append(np.unique(key, return_counts=True))
    return out


class NGramLM(nn.Module):
    """An n-gram language model: `model(ids)` (B, T) -> (B, T, vocab) log-probabilities of the next token.

    Build one with `NGramLM.fit(tokens, vocab_size, order, method)`; position t is predicted from the
    last order-1 tokens up to and including t (fewer at the start of the input).
    """

    def __init__(self, config: NGramConfig, tables: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.config = config.validate()
        if len(tables) != config.order:
            raise FormatError(f"an order-{config.order} model needs {config.order} count tables, got {len(tables)}")
        self.tables = [(torch.as_tensor(k, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64))
                       for k, c in tables]
        self._derive()

    # ---- building -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, tokens, vocab_size: int, order: int = 3, method: str = "kneser_ney",
            block_size: int = 512, name: str = "ngram", **ids) -> NGramLM:
        """Count a token stream (a 1-D array of ids, e.g. the train split's shard) into a model."""
        cfg = NGramConfig(order=order, method=method, vocab_size=vocab_size, block_size=block_size, name=name,
                          train_tokens=int(np.asarray(tokens).size), **ids).validate()
        raw = ngram_counts(tokens, order, vocab_size)
        if raw[0][0].size == 0:
            raise ConfigError("no tokens to count: the training text is empty")
        if method == "backoff":
            return cls(cfg, raw)
        tables = []
        for k in range(1, order + 1):  # KN: continuation counts below the highest order
            if k == order:
                tables.append(raw[k - 1])
            else:  # N1+(. g): how many distinct (k+1)-grams end in g
                tables.append(np.unique(raw[k][0] % vocab_size ** k, return_counts=True))
        return cls(cfg, tables)

    def _derive(self) -> None:
        """Per order: contexts (sorted keys), where each context's words start, word ids, the discounted
        probability of each stored n-gram and each context's left-over mass."""
        V, kn = self.config.vocab_size, self.config.method == "kneser_ney"
        self.levels = []
        discounts = {}
        for k, (keys, counts) in enumerate(self.tables, start=1):
            c = counts.double()
            ds = _discounts(counts.numpy(), kn)
            discounts[str(k)] = ds
            D = torch.tensor(ds, dtype=torch.float64)[(counts.clamp(max=len(ds)) - 1)]  # D(c) per n-gram
            ctx, word = keys // V, keys % V
            uctx, inverse, n_words = torch.unique_consecutive(ctx, return_inverse=True, return_counts=True)
            total = torch.zeros(len(uctx), dtype=torch.float64).index_add_(0, inverse, c)
            leftover = torch.zeros(len(uctx), dtype=torch.float64).index_add_(0, inverse, D) / total
            start = torch.cumsum(n_words, 0) - n_words
            prob = (c - D).clamp(min=0) / total[inverse]
            if k == 1:  # the unigram, interpolated with the uniform distribution
                p = torch.full((V,), leftover.item() / V, dtype=torch.float64)
                p.index_add_(0, word, prob)
                self.unigram = p
                continue
            self.levels.append({"ctx": uctx, "start": start, "n": n_words, "word": word, "prob": prob,
                                "leftover": leftover})
        self.config.discounts = discounts

    # ---- scoring ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, vocab) fp32 log-probabilities of the token after each position."""
        return self.probs(input_ids).log().float()

    def probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, vocab) float64 probabilities of the token after each position."""
        B, T = input_ids.shape
        V = self.config.vocab_size
        x = input_ids.to(torch.int64).cpu()
        if x.numel() and (x.min() < 0 or x.max() >= V):
            raise ConfigError(f"token ids must lie in [0, {V}) for this n-gram model; got {x.min()}..{x.max()}")
        p = self.unigram.expand(B * T, V).clone()  # (B*T, V) float64
        key = x.clone()  # key of the m tokens ending at each position
        valid = torch.ones(B, T, dtype=torch.bool)
        for m, lv in enumerate(self.levels, start=1):  # order m + 1: a context of m tokens
            if m > 1:
                shifted = torch.zeros_like(x)
                shifted[:, m - 1:] = x[:, :T - m + 1]
                key = shifted * V ** (m - 1) + key
                valid[:, :m - 1] = False
            flat = key.reshape(-1)
            idx = torch.searchsorted(lv["ctx"], flat).clamp(max=max(len(lv["ctx"]) - 1, 0))
            found = valid.reshape(-1) & (lv["ctx"].numel() > 0)
            if lv["ctx"].numel():
                found &= lv["ctx"][idx] == flat
            rows = found.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue  # no context of this length was seen: the lower order stands
            self._apply_level(p, rows, idx[rows], lv)
        return p.reshape(B, T, V)

    def _apply_level(self, p: torch.Tensor, rows: torch.Tensor, ci: torch.Tensor, lv: dict) -> None:
        """Turn the lower-order rows `p[rows]` into this order's, for contexts `ci` (indices into lv)."""
        n = lv["n"][ci]
        local = torch.repeat_interleave(torch.arange(len(rows)), n)  # which row each stored n-gram serves
        first = torch.repeat_interleave(lv["start"][ci] - (torch.cumsum(n, 0) - n), n)
        ent = first + torch.arange(int(n.sum()))  # indices of the stored n-grams of these contexts
        r, w, a = rows[local], lv["word"][ent], lv["prob"][ent]
        left = lv["leftover"][ci]
        if self.config.method == "kneser_ney":
            p[rows] *= left[:, None]
            p.index_put_((r, w), a, accumulate=True)
            return
        # backoff: seen words take their discounted estimate; the rest share the left-over mass in
        # proportion to the lower order
        seen = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, local, p[r, w])
        rest = 1 - seen
        tight = rest < 1e-9  # the seen words hold all the lower order's mass: renormalise them instead
        alpha = torch.where(tight, torch.zeros_like(rest), left / rest.clamp(min=1e-9))
        scale = torch.where(tight, 1 / (1 - left), torch.ones_like(left))
        p[rows] *= alpha[:, None]
        p[r, w] = a * scale[local]

    # ---- accounting and persistence ------------------------------------------------------------
    def num_params(self) -> int:
        """Stored n-grams (the model's size: one count each)."""
        return sum(k.numel() for k, _ in self.tables)

    def save(self, folder: Path) -> None:
        """Write config.json and ngram.safetensors into `folder` (an existing folder)."""
        from safetensors.torch import save_file

        save_file({f"order{k}.{what}": t.contiguous() for k, (keys, counts) in enumerate(self.tables, start=1)
                   for what, t in (("keys", keys), ("counts", counts))}, str(Path(folder) / "ngram.safetensors"),
                  metadata={"format": "pt"})
        (Path(folder) / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **asdict(self.config)},
                                                             indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> NGramLM:
        """Read a folder written by `save`; raises `FormatError` on a missing or damaged file."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            d = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{folder}: cannot read the n-gram config.json ({e})") from e
        if d.pop("model_type", None) != MODEL_TYPE:
            raise FormatError(f"{folder}: config.json is not an n-gram model (model_type {MODEL_TYPE!r})")
        try:
            cfg = NGramConfig(**d)
        except TypeError as e:
            raise FormatError(f"{folder}: config.json has fields an n-gram config does not know ({e})") from e
        try:
            t = load_file(str(folder / "ngram.safetensors"))
        except Exception as e:  # safetensors raises its own types for missing/truncated files
            raise FormatError(f"{folder}/ngram.safetensors: cannot read the counts ({e}); the folder is "
                              "incomplete or the file is corrupt: fit the model again") from e
        try:
            tables = [(t[f"order{k}.keys"], t[f"order{k}.counts"]) for k in range(1, cfg.order + 1)]
        except KeyError as e:
            raise FormatError(f"{folder}/ngram.safetensors: missing table {e} for an order-{cfg.order} model") from e
        return cls(cfg, tables)
