"""Model merging: combine fine-tunes of one base model into one model, with no training.

With base weights w0 and fine-tunes w_1..w_n, the task vectors are t_i = w_i - w0 (Ilharco et al. 2023).

- average (model soup, Wortsman et al. 2022):  w = sum_i a_i w_i,  a_i = weights (uniform by default)
- task arithmetic (Ilharco et al. 2023):      w = w0 + scale * sum_i a_i t_i  (a_i = 1 by default)
- TIES (Yadav et al. 2023, sec. 3): per tensor, (1) trim: keep each t_i's `density` fraction of entries
  of largest magnitude, zero the rest; (2) elect: sign s = sign(sum_i trimmed t_i); (3) disjoint mean:
  average, per entry, only the trimmed t_i that are non-zero and agree with s;  w = w0 + scale * that.
- DARE (Yu et al. 2024): drop each entry of t_i with probability p = 1 - density and rescale the kept
  ones by 1 / (1 - p), so the expected task vector is unchanged; then task arithmetic (`dare`) or TIES's
  elect + disjoint mean (`dare_ties`).

Tensors that are not floating point (and any tensor identical in every model) are taken from the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from lmforge.errors import ConfigError

Method = Literal["average", "task_arithmetic", "ties", "dare", "dare_ties"]
METHODS = ("average", "task_arithmetic", "ties", "dare", "dare_ties")


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its round(density * numel) largest-magnitude entries set to 0 (ties: the first)."""
    if density >= 1.0:
        return t.clone()
    k = int(round(density * t.numel()))
    if k <= 0:
        return torch.zeros_like(t)
    flat = t.flatten()
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(t)


def dare(t: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry of `t` with probability `drop`, scale the kept ones by 1 / (1 - drop)."""
    if drop <= 0.0:
        return t.clone()
    keep = torch.rand(t.shape, generator=generator) >= drop
    return torch.where(keep, t / (1.0 - drop), torch.zeros_like(t))


def elect_and_merge(tvs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES steps 2-3: the sign of the (weighted) sum per entry, then the mean of the agreeing non-zeros."""
    stacked = torch.stack([w * t for w, t in zip(weights, tvs)])  # (n, ...)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    total = (stacked * agree).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def merge_tensors(base: torch.Tensor | None, models: Sequence[torch.Tensor], method: Method,
                  weights: Sequence[float] | None = None, density: float = 1.0, scale: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One merged tensor (in fp32 arithmetic, returned in the models' dtype). `base` may be None for average."""
    n = len(models)
    dtype = models[0].dtype
    ms = [m.float() for m in models]
    if method == "average":
        w = weights or [1.0 / n] * n
        return sum(wi * m for wi, m in zip(w, ms)).to(dtype)
    if base is None:
        raise ConfigError(f"{method} merging needs the base model the fine-tunes started from (--base)")
    b = base.float()
    tvs = [m - b for m in ms]
    w = list(weights) if weights else [1.0] * n
    if method == "task_arithmetic":
        delta = sum(wi * t for wi, t in zip(w, tvs))
    elif method == "ties":
        delta = elect_and_merge([trim(t, density) for t in tvs], w)
    elif method in ("dare", "dare_ties"):
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        dropped = [dare(t, 1.0 - density, g) for t in tvs]
        delta = sum(wi * t for wi, t in zip(w, dropped)) if method == "dare" else elect_and_merge(dropped, w)
    else:
        raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    return (b + scale * delta).to(dtype)


def merge_state_dicts(base: dict[str, torch.Tensor] | None, models: Sequence[dict[str, torch.Tensor]],
                      method: Method = "ties", weights: Sequence[float] | None = None, density: float = 1.0,
                      scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge state dicts of fine-tunes of one base, key by key (see the module docstring).

    Raises ConfigError when the models do not share every key and shape (not fine-tunes of one base).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if len(models) < 2 and not (len(models) == 1 and method != "average"):
        raise ConfigError("merging needs at least two models (or one fine-tune and its base)")
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"{len(weights)} weights for {len(models)} models; give one weight per model")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    ref = base if base is not None else models[0]
    for i, m in enumerate(models):
        _check_same(ref, m, "the base" if base is not None else "model 0", f"model {i}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in ref.items():
        tensors = [m[k] for m in models]
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        out[k] = merge_tensors(base[k] if base is not None else None, tensors, method, weights, density, scale, g)
    return out


def _check_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], name_a: str, name_b: str) -> None:
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise ConfigError(f"{name_b} does not have the same tensors as {name_a} (missing {missing[:3]}, extra "
                          f"{extra[:3]}): merging needs fine-tunes of one base model")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ConfigError(f"tensor {k!r} is {tuple(b[k].shape)} in {name_b} but {tuple(a[k].shape)} in "
                              f"{name_a}: merging needs fine-tunes of one base model")


def _plain_state(llm) -> dict[str, torch.Tensor]:
    """Whole weights under the plain model's keys, LoRA adapters folded in: merging works on whole weights."""
    model = llm.model
    try:
        from lmforge.adapt import adapter_layers, has_adapters, merge_adapters, unmerge_adapters
    except ImportError:
        return dict(model.state_dict())
    if not has_adapters(model):
        return dict(model.state_dict())
    merge_adapters(model)
    try:
        paths = [p for p, _ in adapter_layers(model)]
        out = {}
        for k, v in model.state_dict().items():
            owner = next((p for p in paths if k.startswith(p + ".")), None)
            if owner is None:
                out[k] = v.clone()
            elif k[len(owner) + 1:].startswith("base."):  # the merged weight; adapter tensors are left out
                out[f"{owner}.{k[len(owner) + 6:]}"] = v.clone()
        return out
    finally:
        unmerge_adapters(model)


def merge_models(models: Sequence, base=None, method: Method = "ties", weights: Sequence[float] | None = None,
                 density: float = 1.0, scale: float = 1.0, seed: int = 0):
    """Merge `LLM`s (or model folders) of one base into a new `LLM` with the first model's tokenizer."""
    from lmforge.llm import LLM, load
    from lmforge.loading import build

    llms = [load(m) if isinstance(m, (str, Path)) else m for m in models]
    base_llm = load(base) if isinstance(base, (str, Path)) else base
    cfg = llms[0].config
    for i, m in enumerate(llms[1:], 1):
        if m.config.to_dict() != cfg.to_dict():
            raise ConfigError(f"model {i} has a different config from model 0; merging needs fine-tunes of one base")
    sd = merge_state_dicts(_plain_state(base_llm) if base_llm is not None else None,
                           [_plain_state(m) for m in llms], method, weights, density, scale, seed)
    return LLM(build(cfg, sd, "merged model"), llms[0].tokenizer, "merged")
