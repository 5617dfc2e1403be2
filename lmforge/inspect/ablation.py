"""Head ablation: how much a loss or a logit difference changes when one attention head is masked.

A masked head's output is zeroed before the output projection (Michel et al. 2019, "Are Sixteen Heads Really
Better than One?", who score heads the same way; Wang et al. 2023, "Interpretability in the Wild", for the logit
difference of a target against a distractor). Each forward pass ablates every head of one layer at once, one head
per copy of the batch (`trace`'s per-row `head_weights`), so a sweep costs one pass per layer and batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.models.capture import capturing, encode_inputs, target_id, unwrap
from lmforge.models.mixers.attention import Attention

METRICS = ("loss", "logit_diff")


@dataclass
class HeadAblation:
    """The change of a metric when each head is masked (NaN in layers whose token mixer is not attention)."""

    scores: torch.Tensor  # (n_layer, n_head): ablated - baseline
    baseline: float
    metric: str  # "loss" | "logit_diff"
    top: list[tuple[int, int, float]]  # (layer, head, change), largest |change| first, 10 of them

    def to_dict(self) -> dict:
        """JSON-ready: lists, floats and strings (NaN scores as None)."""
        return {"scores": [[None if v != v else v for v in row] for row in self.scores.tolist()],
                "baseline": self.baseline, "metric": self.metric, "top": [list(t) for t in self.top]}


def _metric_rows(model, ids, mask, metric: str, tid: int | None, did: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) per row: next-token NLL summed over real predicted tokens, or the logit difference at the end."""
    if metric == "loss":
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        targets = torch.full_like(ids, -100)
        ok = real[:, 1:] & real[:, :-1]
        targets[:, :-1] = torch.where(ok, ids[:, 1:], targets[:, 1:])
        nll, _ = model(ids, attention_mask=mask, targets=targets)
        return nll.float().sum(1), (targets != -100).sum(1).float()
    logits = model(ids, attention_mask=mask, logits_to_keep=1)[:, -1].float()  # left padding: the last is real
    value = logits[:, tid] - (logits[:, did] if did is not None else logits.logsumexp(-1))
    return value, torch.ones_like(value)


def head_ablation(llm_or_model, texts: list[str] | torch.Tensor, *, metric: str = "loss",
                  target: str | int | None = None, distractor: str | int | None = None, batch_size: int = 8,
                  tokenizer=None) -> HeadAblation:
    """Mask each attention head in turn and measure the metric's change (ablated - baseline) over `texts`.

    Args:
        llm_or_model: an `LLM` or a causal decoder model.
        texts: texts, or token ids (B, T).
        metric: "loss" (next-token cross-entropy, mean over every real predicted token) or "logit_diff" (at each
            text's last token: logit of `target` minus logit of `distractor`, or the target's log-probability
            without a distractor; mean over the texts).
        target: the token (one-token text or id) for "logit_diff".
        distractor: the token it is compared against.
        batch_size: texts per forward pass (each pass runs them once per head of one layer).
        tokenizer: overrides the LLM's own.
    """
    model, tok = unwrap(llm_or_model, tokenizer)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if model.config.is_encoder_decoder or not model.config.attention.causal:
        raise ConfigError(f"head ablation scores a causal decoder's next tokens; {model.config.name!r} is "
                          f"{'an encoder-decoder' if model.config.is_encoder_decoder else 'a bidirectional encoder'}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    tid = did = None
    if metric == "logit_diff":
        if target is None:
            raise ConfigError("metric 'logit_diff' needs a target token (and optionally a distractor)")
        tid = target_id(tok, target, model.config.vocab_size)
        did = None if distractor is None else target_id(tok, distractor, model.config.vocab_size)
    ids, mask = encode_inputs(model, tok, texts)
    layers = [i for i, b in enumerate(model.blocks) if isinstance(b.token_mixer, Attention)]
    if not layers:
        raise ConfigError(f"{model.config.name!r} has no attention layers: there are no heads to ablate")
    nh = model.config.n_head
    total = torch.zeros(len(model.blocks), nh, dtype=torch.float64)
    base, count = 0.0, 0.0
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            x, m = ids[s:s + batch_size], None if mask is None else mask[s:s + batch_size]
            value, n = _metric_rows(model, x, m, metric, tid, did)
            base, count = base + float(value.sum()), count + float(n.sum())
            xs, ms = x.repeat(nh, 1), None if m is None else m.repeat(nh, 1)  # copy h ablates head h
            weights = 1.0 - torch.eye(nh, device=x.device).repeat_interleave(x.shape[0], 0)  # (nh * b, nh)
            for layer in layers:
                with capturing(model, head_weights={layer: weights}):
                    value, _ = _metric_rows(model, xs, ms, metric, tid, did)
                total[layer] += value.double().view(nh, -1).sum(1).cpu()
    baseline = base / count
    scores = (total / count - baseline).float()
    scores[[i for i in range(len(model.blocks)) if i not in layers]] = float("nan")
    flat = [(i, h, float(scores[i, h])) for i in layers for h in range(nh)]
    top = sorted(flat, key=lambda t: -abs(t[2]))[:10]
    return HeadAblation(scores=scores, baseline=baseline, metric=metric, top=top)
