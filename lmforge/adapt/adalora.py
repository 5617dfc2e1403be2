"""AdaLoRA (Zhang et al. 2023): SVD-form adapters whose rank budget moves to where it matters.

Each adapted slice gets dW = P diag(lambda) Q * (alpha / r): P (out, r), lambda (r,), Q (r, in), with
lambda starting at zero (training starts from the base). Over training:

- importance of triplet i (P[:, i], lambda_i, Q[i, :]): for every weight w of it, the sensitivity
  |w * dL/dw| is smoothed (EMA, beta1) and so is its uncertainty |sens - EMA| (beta2); the score is
  their product, lambda's plus the means over P's column and Q's row (the paper's eq. 8-11);
- the budget (how many triplets are kept over all layers) falls from r_init per slice to target_r per
  slice on a cubic schedule between the warm-up steps (eq. 12); every `interval` steps the lambdas
  outside the budget's most important triplets are set to zero;
- an orthogonality penalty gamma (||P^T P - I||^2 + ||Q Q^T - I||^2) keeps P and Q near-orthogonal; it
  is applied to their gradients directly (its exact gradient, 4 P (P^T P - I)), so the loss and the
  trainer stay as they are.

All of it runs from hooks (gradient hooks collect importance, a forward pre-hook on the model counts
training steps and reallocates), so it plugs into the one Trainer without changes. The scores and
the step count are buffers, saved with the adapter, so a resumed run continues exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.adapt.lora import AdapterLayer, Slice, _set_module, select_layers
from lmforge.errors import ConfigError


class AdaLoRALinear(AdapterLayer):
    """`base(x)` plus P diag(lambda) Q x * scale on each adapted output slice."""

    method = "adalora"

    def __init__(self, base: nn.Linear, slices: list[Slice], r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.slices, self.r, self.alpha, self.scale = base, list(slices), r, alpha, alpha / r
        n_in, dev, dt = base.in_features, base.weight.device, base.weight.dtype
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        g = {"device": dev, "dtype": dt}
        self.lora_A = nn.ParameterDict({s.name: nn.Parameter(torch.randn(r, n_in, **g) * 0.02) for s in slices})
        self.lora_E = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(r, **g)) for s in slices})
        self.lora_B = nn.ParameterDict({s.name: nn.Parameter(torch.randn(s.size, r, **g) * 0.02) for s in slices})
        for kind in ("A", "E", "B"):  # EMA of sensitivity and of its uncertainty, per weight
            for s in slices:
                shape = getattr(self, f"lora_{kind}")[s.name].shape
                self.register_buffer(f"ema_{kind}_{s.name}", torch.zeros(shape, **g))
                self.register_buffer(f"unc_{kind}_{s.name}", torch.zeros(shape, **g))

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight."""
        return self.base.weight

    def adapter_tensors(self):
        """Parameters and importance buffers (both saved with the adapter)."""
        yield from self.adapter_parameters()
        for name, b in self.named_buffers():
            if not name.startswith("base."):
                yield name, b

    def settings(self) -> dict:
        """What re-creates the layer's shape (the controller saves the schedule)."""
        return {"r": self.r, "alpha": self.alpha}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        xd = self.dropout(x)
        pieces, pos = [], 0
        for s in self.slices:
            if s.start > pos:
                pieces.append(y.new_zeros(*y.shape[:-1], s.start - pos))
            h = xd @ (self.lora_A[s.name] * self.lora_E[s.name].unsqueeze(1)).t()  # (..., r)
            pieces.append(h @ self.lora_B[s.name].t() * self.scale)
            pos = s.start + s.size
        if pos < y.shape[-1]:
            pieces.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - pos))
        return y + torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def update_importance(self, kind: str, name: str, grad: torch.Tensor, beta1: float, beta2: float) -> None:
        """Fold one gradient into the smoothed sensitivity and uncertainty of `lora_{kind}[name]`."""
        w = getattr(self, f"lora_{kind}")[name]
        sens = (w * grad).abs()
        ema, unc = getattr(self, f"ema_{kind}_{name}"), getattr(self, f"unc_{kind}_{name}")
        ema.mul_(beta1).add_(sens, alpha=1 - beta1)
        unc.mul_(beta2).add_((sens - ema).abs(), alpha=1 - beta2)

    def scores(self, name: str) -> torch.Tensor:
        """(r,) importance of each triplet of slice `name`."""
        s = {k: getattr(self, f"ema_{k}_{name}") * getattr(self, f"unc_{k}_{name}") for k in "AEB"}
        return s["E"] + s["A"].mean(1) + s["B"].mean(0)

    def merge(self) -> None:
        """Fold-in is left to LoRA layers; AdaLoRA layers stay separate."""
        raise ConfigError("AdaLoRA adapters are not merged; train with lora/dora to merge")

    def unmerge(self) -> None:
        """Nothing to undo."""


class AdaLoRAController(AdapterLayer):
    """The rank-budget schedule over all `AdaLoRALinear`s of a model (held at `model.adalora`)."""

    method = "adalora"

    def __init__(self, total_steps: int, target_r: int, init_r: int, warmup: int, final: int, interval: int,
                 beta1: float = 0.85, beta2: float = 0.85, orth_reg: float = 0.1):
        super().__init__()
        if not 0 < target_r <= init_r:
            raise ConfigError(f"AdaLoRA needs 0 < target_r <= r, got target_r={target_r}, r={init_r}")
        if warmup + final >= total_steps:
            raise ConfigError(f"AdaLoRA warm-up ({warmup}) + final ({final}) steps must be fewer than the run's "
                              f"{total_steps} steps")
        self.total, self.target_r, self.init_r = total_steps, target_r, init_r
        self.warmup, self.final, self.interval = warmup, final, max(interval, 1)
        self.beta1, self.beta2, self.orth_reg = beta1, beta2, orth_reg
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def settings(self) -> dict:
        """The schedule (saved in lmforge_adapter.json)."""
        return {"total_steps": self.total, "target_r": self.target_r, "r": self.init_r, "warmup": self.warmup,
                "final": self.final, "interval": self.interval, "beta1": self.beta1, "beta2": self.beta2,
                "orth_reg": self.orth_reg}

    def adapter_tensors(self):
        """The step count."""
        yield "step", self.step

    def budget(self, step: int, n_slices: int) -> int:
        """Triplets kept over all slices at `step` (the cubic schedule, eq. 12)."""
        lo, hi = self.target_r * n_slices, self.init_r * n_slices
        if step <= self.warmup:
            return hi
        if step >= self.total - self.final:
            return lo
        frac = 1 - (step - self.warmup) / (self.total - self.final - self.warmup)
        return int(lo + (hi - lo) * frac ** 3)

    @torch.no_grad()
    def reallocate(self, model: nn.Module) -> int:
        """Zero the lambdas outside the budget's most important triplets; returns the budget."""
        layers = [m for m in model.modules() if isinstance(m, AdaLoRALinear)]
        keys = [(m, s.name) for m in layers for s in m.slices]
        budget = self.budget(int(self.step), len(keys))
        scores = torch.cat([m.scores(n) for m, n in keys])
        if budget < scores.numel():
            threshold = scores.kthvalue(scores.numel() - budget).values
            for m, n in keys:
                m.lora_E[n].masked_fill_(m.scores(n) <= threshold, 0.0)
        return budget

    def on_forward(self, model: nn.Module, _args) -> None:
        """Forward pre-hook: a training forward is a step; reallocate on the schedule."""
        if not model.training or not torch.is_grad_enabled() or self.disabled:
            return
        step = int(self.step)
        if self.warmup < step and (step % self.interval == 0 or step >= self.total - self.final):
            self.reallocate(model)
        self.step += 1

    def ranks(self, model: nn.Module) -> dict[str, int]:
        """{slice: non-zero lambdas}: where the budget went."""
        return {f"{p}.{s.name}": int((m.lora_E[s.name] != 0).sum()) for p, m in model.named_modules()
                if isinstance(m, AdaLoRALinear) for s in m.slices}

    def merge(self) -> None:
        """Not a weight."""

    def unmerge(self) -> None:
        """Not a weight."""


def _hooks(layer: AdaLoRALinear, ctl: AdaLoRAController) -> None:
    for s in layer.slices:
        for kind in "AEB":
            p = getattr(layer, f"lora_{kind}")[s.name]

            def hook(grad, kind=kind, name=s.name, p=p):
                if kind in "AB" and ctl.orth_reg > 0:  # d/dP gamma ||P^T P - I||^2 (Q: rows instead)
                    w = p.detach() if kind == "B" else p.detach().t()
                    extra = 4 * ctl.orth_reg * w @ (w.t() @ w - torch.eye(w.shape[1], dtype=w.dtype, device=w.device))
                    grad = grad + (extra if kind == "B" else extra.t())
                layer.update_importance(kind, name, grad, ctl.beta1, ctl.beta2)
                return grad

            p.register_hook(hook)


def apply_adalora(model: nn.Module, total_steps: int, r: int = 12, target_r: int = 8, alpha: float = 16.0,
                  dropout: float = 0.0, target_modules: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
                  warmup: int | None = None, final: int | None = None, interval: int = 10,
                  orth_reg: float = 0.1) -> nn.Module:
    """SVD-form adapters on the matching layers, the rank schedule at `model.adalora`; in place.

    warmup / final default to 10% / 30% of `total_steps` (all ranks kept before; the target after).
    """
    chosen = select_layers(model, target_modules)
    warmup = total_steps // 10 if warmup is None else warmup
    final = (3 * total_steps) // 10 if final is None else final
    ctl = AdaLoRAController(total_steps, target_r, r, warmup, final, interval, orth_reg=orth_reg)
    for p in model.parameters():
        p.requires_grad_(False)
    for path, slices in chosen.items():
        layer = AdaLoRALinear(model.get_submodule(path), slices, r, alpha, dropout)
        _set_module(model, path, layer)
        _hooks(layer, ctl)
    model.adalora = ctl
    model.register_forward_pre_hook(ctl.on_forward)
    return model
