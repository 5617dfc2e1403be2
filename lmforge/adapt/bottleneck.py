"""Bottleneck adapters (Houlsby et al. 2019) as module swaps, and lmforge's adapter files for every
method peft cannot hold (bottleneck, prompt, prefix, AdaLoRA with its importance state).

Each linear that writes a sub-layer's output back into the residual stream (the mixers' `resid_projs`:
attention's and the MLP's `proj`) becomes `BottleneckAdapter(proj)`: y = proj(x); y + W_up f(W_down y),
two adapters per block as in the paper. W_up starts at zero, so training starts from the base exactly.
Only the adapters train. peft has no such method, so these save in lmforge's own two files,
lmforge_adapter.json + lmforge_adapter.safetensors, beside the base weights (`LLM.save` / `lmforge.load`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.adapt.lora import AdapterLayer, adapter_layers
from lmforge.errors import ConfigError, FormatError
from lmforge.io import write_json

CONFIG_FILE = "lmforge_adapter.json"
WEIGHTS_FILE = "lmforge_adapter.safetensors"


class BottleneckAdapter(AdapterLayer):
    """`base(x)` followed by a residual bottleneck: y + up(gelu(down(dropout(y)))), size -> r -> size."""

    method = "adapter"

    def __init__(self, base: nn.Linear, r: int, dropout: float = 0.0):
        super().__init__()
        self.base, self.r = base, r
        n, dev, dt = base.out_features, base.weight.device, base.weight.dtype
        self.adapter_down = nn.Linear(n, r, device=dev, dtype=dt)
        self.adapter_up = nn.Linear(r, n, device=dev, dtype=dt)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)  # near-identity start (Houlsby section 2.1)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        return y + self.adapter_up(F.gelu(self.adapter_down(self.dropout(y))))

    def settings(self) -> dict:
        """What re-creates it (saved in lmforge_adapter.json)."""
        return {"r": self.r, "dropout": self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0}

    def merge(self) -> None:
        """A bottleneck is non-linear: it cannot be folded into a weight."""
        raise ConfigError("bottleneck adapters are non-linear and cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Nothing to undo (never merged)."""


def apply_bottleneck_adapters(model: nn.Module, r: int = 16, dropout: float = 0.0) -> nn.Module:
    """Add a bottleneck adapter after every residual-writing projection; freeze the rest; in place."""
    if r < 1:
        raise ConfigError(f"bottleneck size r must be >= 1, got {r}")
    targets = []
    for block in model.blocks:
        for mixer in (block.token_mixer, block.channel_mixer):
            for name in getattr(mixer, "resid_projs", ()) if mixer is not None else ():
                if isinstance(getattr(mixer, name, None), nn.Linear):
                    targets.append((mixer, name))
    if not targets:
        raise ConfigError("this model has no residual projections (nn.Linear resid_projs) to put adapters after")
    for p in model.parameters():
        p.requires_grad_(False)
    for mixer, name in targets:
        setattr(mixer, name, BottleneckAdapter(getattr(mixer, name), r, dropout))
    return model


def save_native_adapter(model: nn.Module, folder: str | Path) -> None:
    """Write lmforge's adapter files (bottleneck adapters, prompt or prefix tuning): config and tensors."""
    layers = list(adapter_layers(model))
    methods = {getattr(m, "method", type(m).__name__) for _, m in layers}
    if len(methods) != 1 or not hasattr(layers[0][1], "settings"):
        raise ConfigError(f"cannot save adapters of kinds {sorted(methods)} together in lmforge's format")
    tensors = {f"{p}.{n}": t.detach().contiguous().cpu() for p, m in layers for n, t in m.adapter_tensors()}
    folder = Path(folder)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    method = methods.pop()
    settings = layers[0][1].settings()
    if method == "adalora":  # the schedule and where the adapters sit
        ctl = model.adalora
        settings = {**settings, **ctl.settings(), "dropout": getattr(layers[0][1].dropout, "p", 0.0),
                    "target_modules": sorted({s.hf_name for _, m in layers for s in getattr(m, "slices", ())})}
    write_json(folder / CONFIG_FILE, {"method": method, **settings})


def load_native_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put lmforge-format adapters from `folder` on `model` (tensor names and shapes checked)."""
    from lmforge.adapt.virtual import apply_prefix_tuning, apply_prompt_tuning

    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise FormatError(f"{folder}: cannot read its lmforge adapter files ({e})") from None
    method = cfg.get("method")
    try:
        if method == "adapter":
            apply_bottleneck_adapters(model, int(cfg["r"]), float(cfg.get("dropout", 0.0)))
        elif method == "adalora":
            from lmforge.adapt.adalora import apply_adalora

            apply_adalora(model, int(cfg["total_steps"]), r=int(cfg["r"]), target_r=int(cfg["target_r"]),
                          alpha=float(cfg["alpha"]), dropout=float(cfg["dropout"]),
                          target_modules="|".join(re.escape(t) for t in cfg["target_modules"]),
                          warmup=int(cfg["warmup"]), final=int(cfg["final"]), interval=int(cfg["interval"]),
                          orth_reg=float(cfg["orth_reg"]))
        elif method in ("prompt", "prefix"):
            (apply_prompt_tuning if method == "prompt" else apply_prefix_tuning)(model, int(cfg["n"]))
        else:
            raise FormatError(f"{folder / CONFIG_FILE}: unknown adapter method {method!r}")
    except KeyError as e:
        raise FormatError(f"{folder / CONFIG_FILE}: missing setting {e}") from None
    own = {f"{p}.{n}": t for p, m in adapter_layers(model) for n, t in m.adapter_tensors()}
    bad = [k for k, t in tensors.items() if k not in own or own[k].shape != t.shape]
    if bad or len(tensors) != len(own):
        raise FormatError(f"{folder}: the adapter does not fit this model ({bad[:3] or 'tensor count differs'}); "
                          "it belongs to a different base model")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    return model
