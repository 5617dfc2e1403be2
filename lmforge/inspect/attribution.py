"""Which input tokens drove an output: integrated gradients, gradient x input and saliency on the input embeddings.

Everything is attributed to the token embedding layer's OUTPUT (`model.tok_emb(ids)`, before any embedding
scale, position, token-type embedding or embedding norm is added): the tensor Captum's
`LayerIntegratedGradients(forward, model.tok_emb)` attributes to. The model runs on it through
`hidden_states(..., inputs_embeds=...)`, so every family (attention, Mamba, RWKV, RetNet, MoE, ...) is
differentiated by its own code.

The scalar explained (the "target"):

- a causal decoder: the logit of the target token at the last position (by default the model's own greedy
  next token after the text);
- a bidirectional encoder (MiniLM, BERT): dimension `target` of the mean-pooled final hidden states (the
  sentence embedding before normalisation; by default its largest dimension);
- an encoder-decoder (T5): the logit of the target as the decoder's first token, attributed to the source
  embeddings.

Integrated gradients (Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", 2017) integrate
the gradient along the straight path from a baseline to the input, with Captum's quadrature rules (Riemann
left/right/middle/trapezoid, Gauss-Legendre). The completeness delta, sum(attributions) - (F(input) -
F(baseline)), is always computed: it is not monotone in the number of steps, so it is reported rather than
assumed small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import NO_TOKENIZER, ConfigError
from lmforge.tokenizers.wordpiece import special_id

METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
BASELINES = ("zeros", "pad", "mask", "unk")


@dataclass
class Attribution:
    """Per-token attribution of one scalar output to the input embeddings.

    Attributes:
        tokens: the input tokens as strings (one decode per id; "" without a tokenizer).
        input_ids: (T,) the input ids.
        scores: (T,) per-token attribution: `per_dim` summed over the embedding dimension.
        per_dim: (T, C) attribution per embedding dimension.
        target_id: the explained token id (or pooled dimension, for an encoder).
        target: its text ("" without a tokenizer; "dim <i>" for an encoder).
        method: "integrated_gradients" | "gradient_x_input" | "saliency".
        delta: integrated gradients' completeness delta, sum(per_dim) - (F(input) - F(baseline)); None otherwise.
        steps: integration steps (integrated gradients), else None.
        baseline: "zeros" | "pad" | "mask" | "unk" | "tensor" (integrated gradients), else None.
    """

    tokens: list[str]
    input_ids: torch.Tensor
    scores: torch.Tensor
    per_dim: torch.Tensor
    target_id: int
    target: str
    method: str
    delta: float | None
    steps: int | None
    baseline: str | None
    quadrature: str | None = None  # the integration rule (integrated gradients), else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (no per-dimension matrix: it is T x C floats that no page shows)."""
        return {"method": self.method, "tokens": list(self.tokens), "input_ids": self.input_ids.tolist(),
                "scores": [float(s) for s in self.scores], "target_id": int(self.target_id),
                "target": self.target, "delta": self.delta, "steps": self.steps, "baseline": self.baseline,
                "quadrature": self.quadrature}


# ---- quadrature (Captum's rules, `captum.attr._utils.approximation_methods`) ----------------------------

def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """(weights, alphas) of `steps` points on [0, 1] for the path integral, as Captum defines them.

    Riemann: equal widths 1/n at n points (left: 0 .. 1-1/n, right: 1/n .. 1, middle: the cell centres,
    trapezoid: 0 .. 1 with the two end widths halved); the alphas come from fp32 `torch.linspace`, as in
    Captum. Gauss-Legendre: numpy's nodes and weights moved from [-1, 1] to [0, 1].
    """
    if method not in METHODS:
        raise ConfigError(f"unknown integration method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    if steps < 2:
        raise ConfigError(f"{method} needs steps >= 2 (got {steps}); gausslegendre works from 1")
    n = steps
    widths = [1 / n] * n
    kind = method.split("_")[1]
    if kind == "trapezoid":
        widths[0] /= 2
        widths[-1] /= 2
    lo, hi = {"trapezoid": (0.0, 1.0), "left": (0.0, 1 - 1 / n), "right": (1 / n, 1.0),
              "middle": (1 / (2 * n), 1 - 1 / (2 * n))}[kind]
    return widths, torch.linspace(lo, hi, n).tolist()


# ---- inputs -------------------------------------------------------------------------------------------

def _unpack(llm_or_model, tokenizer) -> tuple[nn.Module, Any, Callable[[str], list[int]] | None]:
    """(model, tokenizer, text -> ids) from an LLM or a bare model."""
    if isinstance(llm_or_model, nn.Module):
        model, tok, encode = llm_or_model, tokenizer, None
    else:
        model = llm_or_model.model
        tok = tokenizer if tokenizer is not None else llm_or_model.tokenizer
        encode = getattr(llm_or_model, "encode_prompt", None) if tokenizer is None else None
    if not hasattr(model, "tok_emb") or not hasattr(model, "config"):
        raise ConfigError(f"{type(model).__name__} has no token embedding to attribute to (an n-gram model?); "
                          "attribution needs a neural model")
    if encode is None and tok is not None:
        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=True)
    return model, tok, encode


def _input_ids(text_or_ids, encode, device: torch.device) -> torch.Tensor:
    """(1, T) long ids of a text or of ids given as a list or a (T,) / (1, T) tensor."""
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise ConfigError("empty text: give at least one token to attribute over")
        if encode is None:
            raise ConfigError(NO_TOKENIZER)
        ids = torch.tensor(encode(text_or_ids), dtype=torch.long)
    else:
        ids = torch.as_tensor(text_or_ids).long()
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ConfigError(f"attribution takes one sequence: ids of shape (T,) or (1, T), got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ConfigError("empty input: give at least one token to attribute over")
    return ids.to(device).unsqueeze(0)


def _decode(tok, i: int) -> str:
    return tok.decode([int(i)], skip_special_tokens=False) if tok is not None else ""


# ---- the scalar explained -----------------------------------------------------------------------------

class _Scorer:
    """F(embeddings (N, T, C)) -> (N, T_out...) outputs for one input sequence, of one model kind.

    `logits(e)` gives the full output row per point (next-token logits, or the pooled embedding of an
    encoder); `target(e, t)` only the explained scalar per point (N,), computed from one head row where the
    head is a plain linear layer.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor):
        cfg = model.config
        self.model, self.ids = model, ids
        self.kind = "seq2seq" if cfg.is_encoder_decoder else ("decoder" if cfg.attention.causal else "encoder")
        if self.kind == "seq2seq":
            start = cfg.decoder_start_id if cfg.decoder_start_id is not None else cfg.pad_id
            if start is None:
                raise ConfigError(f"{cfg.name!r} has no decoder_start_id: cannot pick the decoder's first token")
            self.start = torch.full((1, 1), int(start), dtype=torch.long, device=ids.device)

    def _last_hidden(self, e: torch.Tensor) -> torch.Tensor:
        """Final hidden states (N, C) that the head reads for the explained output (decoder / seq2seq)."""
        n = e.shape[0]
        if self.kind == "seq2seq":
            m = self.model
            memory = m.encoder.hidden_states(self.ids.expand(n, -1), inputs_embeds=e)
            return m.decoder.hidden_states(self.start.expand(n, -1), memory=memory)[:, -1]
        return self.model.hidden_states(self.ids.expand(n, -1), inputs_embeds=e)[:, -1]

    def _head(self) -> nn.Module:
        return self.model.decoder if self.kind == "seq2seq" else self.model

    def logits(self, e: torch.Tensor) -> torch.Tensor:
        """(N, V) next-token logits, or (N, C) pooled embeddings for an encoder."""
        if self.kind == "encoder":
            return self.model.hidden_states(self.ids.expand(e.shape[0], -1), inputs_embeds=e).mean(1)
        return self._head().head_logits(self._last_hidden(e))

    def target(self, e: torch.Tensor, t: int) -> torch.Tensor:
        """(N,) the explained scalar per point."""
        if self.kind == "encoder":
            return self.model.hidden_states(self.ids.expand(e.shape[0], -1), inputs_embeds=e)[..., t].mean(1)
        dec = self._head()
        head = dec.lm_head
        if type(head) is not nn.Linear:  # an MLM head, an adapted or quantized head: the whole row of logits
            return dec.head_logits(self._last_hidden(e))[:, t]
        h = self._last_hidden(e)
        if dec.config.embedding.tied_head_scale and dec.config.tie_embeddings:
            h = h * dec.config.d_model ** -0.5
        # only the target's row of the head: the other V - 1 logits never enter the gradient
        out = h @ head.weight[t]
        return out + head.bias[t] if head.bias is not None else out


def _target(scorer: _Scorer, tok, target, x: torch.Tensor) -> tuple[int, str, torch.Tensor | None]:
    """(target id, its text, the output row at `x` when it was computed): the given id or single-token string,
    or the model's own choice at `x`."""
    width = scorer.model.config.d_model if scorer.kind == "encoder" else scorer.model.config.vocab_size
    row = None
    if target is None:
        with torch.no_grad():
            row = scorer.logits(x)[0]
        t = int(row.argmax())
    elif isinstance(target, str):
        if scorer.kind == "encoder":
            raise ConfigError("an encoder's target is a dimension of its pooled embedding (an int), not a string")
        if tok is None:
            raise ConfigError(NO_TOKENIZER)
        ids = tok.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"target {target!r} is {len(ids)} tokens {ids}; give a single token (or its id)")
        t = ids[0]
    elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = int(target)
    else:
        raise ConfigError(f"target must be a token string, an id or None, got {type(target).__name__}")
    if not 0 <= t < width:
        what = "pooled dimension" if scorer.kind == "encoder" else "token id"
        raise ConfigError(f"target {what} {t} is out of range [0, {width})")
    return t, (f"dim {t}" if scorer.kind == "encoder" else _decode(tok, t)), row


def _prepare(llm_or_model, text_or_ids, target, tokenizer):
    """(scorer, tokenizer, ids (1, T), embeddings x (1, T, C), target id, target text, output row at x or None)."""
    model, tok, encode = _unpack(llm_or_model, tokenizer)
    emb = model.tok_emb
    ids = _input_ids(text_or_ids, encode, emb.weight.device)
    vocab = emb.num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ConfigError(f"input ids must be in [0, {vocab})")
    scorer = _Scorer(model, ids)
    with torch.no_grad():
        x = emb(ids).detach()
    return (scorer, tok, ids, x, *_target(scorer, tok, target, x))


def _result(tok, ids, per_dim: torch.Tensor, t: int, text: str, method: str, **kw) -> Attribution:
    per_dim = per_dim[0].detach().float()
    if not torch.isfinite(per_dim).all():
        # e.g. an all-zero embedding in a model with pre-RMSNorm and no biases (SmolLM2): every layer's input
        # stays 0, where each norm multiplies the gradient by 1/sqrt(eps), and 30 layers of that overflow fp32
        near = f" on the path from the {kw['baseline']!r} baseline" if kw.get("baseline") else ""
        raise ConfigError(f"the gradient is not finite{near}: the model is singular there (an all-zero input to "
                          "its norms?); use baseline='pad', 'unk' or a tensor")
    return Attribution(tokens=[_decode(tok, i) for i in ids[0].tolist()], input_ids=ids[0].detach().cpu(),
                       scores=per_dim.sum(-1).cpu(), per_dim=per_dim.cpu(), target_id=t, target=text,
                       method=method, delta=kw.get("delta"), steps=kw.get("steps"), baseline=kw.get("baseline"),
                       quadrature=kw.get("quadrature"))


# ---- the three methods --------------------------------------------------------------------------------

def _baseline(scorer: _Scorer, tok, baseline, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(baseline embeddings (1, T, C), its name)."""
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(device=x.device, dtype=x.dtype)
        b = b.unsqueeze(0) if b.dim() == 2 else b
        if b.shape != x.shape:
            raise ConfigError(f"baseline tensor must have the input embeddings' shape {tuple(x.shape[1:])}, "
                              f"got {tuple(baseline.shape)}")
        return b, "tensor"
    if baseline not in BASELINES:
        raise ConfigError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)} or a (T, C) tensor")
    if baseline == "zeros":
        return torch.zeros_like(x), "zeros"
    i = special_id(tok, baseline) if tok is not None else None
    if i is None and baseline == "pad":
        i = getattr(tok, "pad_id", None) if getattr(tok, "pad_id", None) is not None else scorer.model.config.pad_id
    if i is None:
        raise ConfigError(f"the tokenizer has no {baseline} token for a {baseline!r} baseline; use 'zeros' or a tensor")
    with torch.no_grad():  # that token at every position, as Captum's baseline ids full of it
        return scorer.model.tok_emb(torch.full_like(scorer.ids, int(i))).detach(), baseline


def _grad(scorer: _Scorer, points: torch.Tensor, t: int) -> torch.Tensor:
    """d target / d points, (N, T, C): one forward and one backward for the whole batch of points."""
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        out = scorer.target(points, t)
        # the rows are independent, so the gradient of their sum is each row's own gradient
        (g,) = torch.autograd.grad(out.sum(), points)
    return g


def integrated_gradients(llm_or_model, text_or_ids: str | list[int] | torch.Tensor, *,
                         target: str | int | None = None, steps: int = 50, method: str = "gausslegendre",
                         baseline: str | torch.Tensor = "zeros", batch_size: int = 50,
                         tokenizer=None) -> Attribution:
    """Integrated gradients of one output with respect to the input embeddings, with its completeness delta.

    Args:
        llm_or_model: an `LLM` or a model (`DecoderLM`, `EncoderDecoderLM`); pass `tokenizer` with a model.
        text_or_ids: the text, or its ids ((T,) or (1, T)).
        target: the explained token (a single-token string or an id); None: the model's own greedy next
            token. For an encoder: a dimension of the mean-pooled embedding (None: the largest one).
        steps: integration points.
        method: "gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right" or "riemann_middle"
            (Captum's rules and names).
        baseline: "zeros", "pad", "mask" or "unk" (that token's embedding at every position), or a (T, C) tensor.
        batch_size: interpolation points per forward/backward pass.
        tokenizer: the tokenizer, when `llm_or_model` is a bare model.

    Returns:
        An `Attribution` whose `delta` is sum(per_dim) - (F(input) - F(baseline)).
    """
    weights, alphas = quadrature(method, steps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    scorer, tok, ids, x, t, text, row = _prepare(llm_or_model, text_or_ids, target, tokenizer)
    b, bname = _baseline(scorer, tok, baseline, x)
    diff = x - b
    total = torch.zeros_like(x[0])
    for i in range(0, steps, batch_size):
        a = torch.tensor(alphas[i:i + batch_size], dtype=x.dtype, device=x.device).view(-1, 1, 1)
        w = torch.tensor(weights[i:i + batch_size], dtype=x.dtype, device=x.device)
        g = _grad(scorer, b + a * diff, t)  # (n, T, C) at the points baseline + alpha (input - baseline)
        total += (g * w.view(-1, 1, 1)).sum(0)
    per_dim = total.unsqueeze(0) * diff
    with torch.no_grad():  # F at both ends, each alone through the model's whole head, as the model serves it
        fx = row[t] if row is not None else scorer.logits(x)[0, t]
        fb = scorer.logits(b)[0, t]
    # in fp32, summed as Captum's `compute_convergence_delta` sums (one flat sum of the attributions)
    delta = float(per_dim.reshape(-1).sum() - (fx - fb))
    return _result(tok, ids, per_dim, t, text, "integrated_gradients", delta=delta, steps=steps,
                   baseline=bname, quadrature=method)


def gradient_x_input(llm_or_model, text_or_ids: str | list[int] | torch.Tensor, *, target: str | int | None = None,
                     tokenizer=None) -> Attribution:
    """Gradient x input (Shrikumar et al., "Not Just a Black Box", 2016) on the input embeddings.

    Args:
        llm_or_model: an `LLM` or a model; pass `tokenizer` with a model.
        text_or_ids: the text, or its ids ((T,) or (1, T)).
        target: the explained token (a single-token string or an id); None: the model's greedy next token.
        tokenizer: the tokenizer, when `llm_or_model` is a bare model.
    """
    scorer, tok, ids, x, t, text, _ = _prepare(llm_or_model, text_or_ids, target, tokenizer)
    return _result(tok, ids, _grad(scorer, x, t) * x, t, text, "gradient_x_input")


def saliency(llm_or_model, text_or_ids: str | list[int] | torch.Tensor, *, target: str | int | None = None,
             tokenizer=None) -> Attribution:
    """Plain gradient saliency (Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks", 2014):
    |d target / d embedding|, summed over the embedding dimension per token.

    Args:
        llm_or_model: an `LLM` or a model; pass `tokenizer` with a model.
        text_or_ids: the text, or its ids ((T,) or (1, T)).
        target: the explained token (a single-token string or an id); None: the model's greedy next token.
        tokenizer: the tokenizer, when `llm_or_model` is a bare model.
    """
    scorer, tok, ids, x, t, text, _ = _prepare(llm_or_model, text_or_ids, target, tokenizer)
    return _result(tok, ids, _grad(scorer, x, t).abs(), t, text, "saliency")
