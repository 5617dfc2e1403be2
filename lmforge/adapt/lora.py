"""LoRA and DoRA as a module swap: `LoRALinear` wraps a model's linear layer and adds a low-rank update.

LoRA (Hu et al. 2021): y = W x + b + (alpha / r) * B A dropout(x), with A (r, in) Kaiming-uniform and
B (out, r) zero, so training starts from the base model exactly. Only A and B train.
DoRA (Liu et al. 2024): W' = m * (W + s B A) / ||W + s B A||_row, with the magnitude m (out,) trainable,
initialised to ||W||_row, and the norm treated as a constant in backward (the paper's section 4.3, as
`peft` does): y = (m / n - 1) * W x + (m / n) * s * B A x + W x + b, where n = ||W + s B A||_row.

Our model fuses Q/K/V into one `attn.qkv` and gate/up into one `mlp.fc`. A `LoRALinear` therefore holds
one adapter per *slice* of the output (q_proj, k_proj, v_proj of qkv): separate A_i, B_i per slice,
exactly what `peft` builds on a Hugging Face model's separate projections, so the two agree weight for
weight and adapter files interchange (`lmforge.adapt.peft_io`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Slice:
    """A contiguous block of a linear layer's output rows, under the name Hugging Face gives that layer."""

    name: str  # short name, e.g. q_proj (a key of the adapter's ModuleDicts)
    hf_name: str  # full module path in the transformers model, e.g. model.layers.0.self_attn.q_proj
    start: int
    size: int


class _FrozenDequantLinear(torch.autograd.Function):
    """x @ W^T + b for a frozen quantized base, W rebuilt by `base.dequantize()` in forward and again in
    backward: autograd would otherwise keep every layer's full-precision W alive until backward, giving back
    the memory that 4-bit storage saves (QLoRA's point)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        b = base.bias.to(x.dtype) if base.bias is not None else None
        return F.linear(x, base.dequantize(x.dtype), b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.base.dequantize(grad.dtype), None


class AdapterLayer(nn.Module):
    """Base of every adapter module swap: holds the original layer as `base`; `disabled` turns it off."""

    disabled: bool = False

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this module, parameter) of the adapter's own (trainable) parameters."""
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                yield name, p

    def adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What is saved with the adapter: its parameters (and state some methods keep in buffers)."""
        yield from self.adapter_parameters()


class LoRALinear(AdapterLayer):
    """`base(x)` plus a LoRA (or DoRA) update on some output slices of it.

    Args:
        base: the layer being adapted (an `nn.Linear`, or any module with `weight` (out, in) it computes
            x @ W^T + b with, e.g. a quantized linear that dequantizes `weight`).
        slices: the output slices to adapt (see `Slice`); rows outside them are left as they are.
        r, alpha, dropout: rank, scale numerator (scale = alpha / r) and dropout on the adapter's input.
        dora: weight-decomposed LoRA (a trainable magnitude per adapted output row).
    """

    def __init__(self, base: nn.Module, slices: list[Slice], r: int, alpha: float, dropout: float = 0.0,
                 dora: bool = False):
        super().__init__()
        self.base = base
        self.slices = list(slices)
        self.r, self.alpha, self.scale, self.dora = r, alpha, alpha / r, dora
        self.quantized = callable(getattr(base, "dequantize", None))
        if self.quantized:  # e.g. NF4Linear: no float weight, `dequantize()` rebuilds it
            self.in_features, self.out_features = base.in_features, base.out_features
            ref = base.bias if base.bias is not None else next(iter(base.buffers()))
            dev, dt = ref.device, base.bias.dtype if base.bias is not None else torch.float32
        else:
            self.in_features, self.out_features = base.weight.shape[1], base.weight.shape[0]
            dev, dt = base.weight.device, base.weight.dtype
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict({s.name: nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dt)
                                     for s in slices})
        self.lora_B = nn.ModuleDict({s.name: nn.Linear(r, s.size, bias=False, device=dev, dtype=dt)
                                     for s in slices})
        for s in slices:  # peft's default: A Kaiming-uniform, B zero
            nn.init.kaiming_uniform_(self.lora_A[s.name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[s.name].weight)
        if dora:
            wt = self.base_weight()
            self.lora_magnitude = nn.ParameterDict({s.name: nn.Parameter(
                torch.linalg.norm(wt[s.start:s.start + s.size], dim=1).to(dt)) for s in slices})
        self.merged = False
        self._saved: torch.Tensor | None = None  # base weight before merging: un-merge restores it bit-exactly

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, slices={[s.name for s in self.slices]}, dora={self.dora}"
                f"{', merged' if self.merged else ''}")

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads `layer.weight` keeps working after the swap)."""
        return self.base_weight() if self.quantized else self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return getattr(self.base, "bias", None)

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight (out, in) as a float tensor (quantized bases dequantize here)."""
        return self.base.dequantize() if self.quantized else self.base.weight

    def delta_weight(self, s: Slice) -> torch.Tensor:
        """scale * B A for one slice (size, in)."""
        return self.scale * (self.lora_B[s.name].weight @ self.lora_A[s.name].weight)

    def _dora_norm(self, s: Slice, w: torch.Tensor) -> torch.Tensor:
        # ||W + s B A|| per output row, a constant for backward (DoRA section 4.3)
        return torch.linalg.norm(w[s.start:s.start + s.size] + self.delta_weight(s).detach(), dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenDequantLinear.apply(x, self.base) if self.quantized else self.base(x)  # (..., out)
        if self.disabled or self.merged:
            return y
        xd = self.dropout(x)
        if not self.dora:
            return self._add_lora(y, xd)
        pieces, pos = [], 0
        w = self.base_weight()
        for s in self.slices:
            if s.start > pos:
                pieces.append(y.new_zeros(*y.shape[:-1], s.start - pos))
            d = self.lora_B[s.name](self.lora_A[s.name](xd)) * self.scale  # (..., size)
            if self.dora:
                m = self.lora_magnitude[s.name] / self._dora_norm(s, w)  # (size,)
                if isinstance(self.dropout, nn.Identity):  # the base output without bias, as computed
                    bw = y[..., s.start:s.start + s.size]
                    b = getattr(self.base, "bias", None)
                    if b is not None:
                        bw = bw - b[s.start:s.start + s.size]
                else:
                    bw = F.linear(xd, w[s.start:s.start + s.size].to(xd.dtype))
                d = (m - 1) * bw + m * d
            pieces.append(d)
            pos = s.start + s.size
        if pos < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - pos))
        return y + (torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0])

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + scale * B A x per slice: every slice's A in one matmul (the input read once) and the scale on
        the r-wide product rather than the slice-wide one: fewer passes over (tokens x out) tensors."""
        if len(self.slices) == 1:
            a = self.lora_A[self.slices[0].name].weight
        else:
            a = torch.cat([self.lora_A[s.name].weight for s in self.slices])  # (n * r, in)
        h = F.linear(x, a) * self.scale  # (..., n * r)
        pieces, pos, r = [], 0, self.r
        for i, s in enumerate(self.slices):
            if s.start > pos:
                pieces.append(y.new_zeros(*y.shape[:-1], s.start - pos))
            pieces.append(self.lora_B[s.name](h[..., i * r:(i + 1) * r]))  # (..., size)
            pos = s.start + s.size
        if pos < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - pos))
        return y + (torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference without the extra matmuls)."""
        if self.merged:
            return
        if not isinstance(getattr(self.base, "weight", None), nn.Parameter) or not self.base.weight.is_floating_point():
            raise ConfigError(f"cannot merge an adapter into a {type(self.base).__name__} base (quantized); "
                              "merge on a full-precision copy of the base model")
        w = self.base.weight
        self._saved = w.detach().clone()
        new = w.detach().clone()
        for s in self.slices:
            rows = slice(s.start, s.start + s.size)
            adapted = w[rows] + self.delta_weight(s).to(w.dtype)
            if self.dora:
                norm = torch.linalg.norm(adapted, dim=1, keepdim=True)
                adapted = self.lora_magnitude[s.name].view(-1, 1).to(w.dtype) / norm * adapted
            new[rows] = adapted
        w.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before `merge`."""
        if not self.merged:
            return
        self.base.weight.copy_(self._saved)
        self._saved, self.merged = None, False


# ---- finding the layers to adapt ----------------------------------------------------------------

def _hf_prefix(cfg, i: int) -> tuple[str, str]:
    if cfg.family == "gpt2":
        return f"transformer.h.{i}.attn.", f"transformer.h.{i}.mlp."
    return f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."


def linear_slices(model: nn.Module) -> dict[str, list[Slice]]:
    """{module path in our model: its slices under Hugging Face names} for every adaptable linear layer.

    Attention's fused qkv is three slices (q_proj, k_proj, v_proj) and a gated MLP's fc two (gate_proj,
    up_proj); GPT-2 keeps its fused c_attn as one. Linear layers of other shapes are one slice named by
    their own path.
    """
    cfg = model.config
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    gpt2 = cfg.family == "gpt2"
    out: dict[str, list[Slice]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            out[name] = mod.slices  # already adapted: not twice
            continue
        quantized = callable(getattr(mod, "dequantize", None)) and hasattr(mod, "out_features")
        if not quantized and (not isinstance(mod, nn.Linear) or isinstance(mod, AdapterLayer)):
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.(qkv|proj|fc)", name)
        if name == "lm_head":
            out[name] = [Slice("lm_head", "lm_head", 0, cfg.vocab_size)]
        elif m is None:
            n_out = int(mod.out_features)
            out[name] = [Slice(name.split(".")[-1], name, 0, n_out)]
        else:
            i, part, what = int(m.group(1)), m.group(2), m.group(3)
            attn, mlp = _hf_prefix(cfg, i)
            h = cfg.mlp.hidden
            if part == "attn" and what == "qkv":
                out[name] = ([Slice("c_attn", attn + "c_attn", 0, (nh + 2 * nkv) * hs)] if gpt2 else
                             [Slice("q_proj", attn + "q_proj", 0, nh * hs),
                              Slice("k_proj", attn + "k_proj", nh * hs, nkv * hs),
                              Slice("v_proj", attn + "v_proj", (nh + nkv) * hs, nkv * hs)])
            elif part == "attn":
                out[name] = [Slice("c_proj", attn + "c_proj", 0, cfg.d_model) if gpt2 else
                             Slice("o_proj", attn + "o_proj", 0, cfg.d_model)]
            elif what == "fc":
                gated = mod.out_features == 2 * h
                out[name] = ([Slice("c_fc", mlp + "c_fc", 0, h)] if gpt2 else
                             [Slice("gate_proj", mlp + "gate_proj", 0, h), Slice("up_proj", mlp + "up_proj", h, h)]
                             if gated else [Slice("up_proj", mlp + "up_proj", 0, h)])
            else:
                out[name] = [Slice("c_proj", mlp + "c_proj", 0, cfg.d_model) if gpt2 else
                             Slice("down_proj", mlp + "down_proj", 0, cfg.d_model)]
    return out


_REGEX_CHARS = set("*+?[](){}|^$\\")


def pattern_matches(pattern: str, hf_name: str, our_name: str) -> bool:
    """peft's rule: the name ends with the pattern at a dot boundary; a regex pattern must match in full.

    Both the Hugging Face name of a slice (model.layers.0.self_attn.q_proj) and our module path
    (blocks.0.attn.qkv, which covers all its slices) are tried.
    """
    for name in (hf_name, our_name):
        if _REGEX_CHARS & set(pattern):
            if re.fullmatch(pattern, name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def select_layers(model: nn.Module, target_modules: list[str] | str) -> dict[str, list[Slice]]:
    """{module path: its slices matching `target_modules`} (see `apply_lora`); ConfigError when a pattern
    matches nothing, naming the layers there are. Changes nothing."""
    regex = isinstance(target_modules, str)
    patterns = [target_modules] if regex else list(target_modules)
    if not patterns:
        raise ConfigError("target_modules is empty; name the layers to adapt, e.g. ['q_proj', 'v_proj']")
    layers = linear_slices(model)
    used: set[str] = set()
    chosen: dict[str, list[Slice]] = {}
    for path, slices in layers.items():
        for s in slices:
            for p in patterns:
                hit = re.fullmatch(p, s.hf_name) is not None if regex else pattern_matches(p, s.hf_name, path)
                if hit:
                    used.add(p)
                    chosen.setdefault(path, []).append(s)
                    break
    unused = [p for p in patterns if p not in used]
    if unused:
        some = sorted({s.name for sl in layers.values() for s in sl})
        raise ConfigError(f"LoRA target pattern(s) {unused} match no layer of this {model.config.family} model; "
                          f"its layers are named {', '.join(some)} (or by path, e.g. blocks.0.attn.qkv)")
    return chosen


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: list[str] | str = ("q_proj", "v_proj"), dora: bool = False) -> nn.Module:
    """Swap the matching linear layers of `model` for `LoRALinear`s and freeze everything else; in place.

    target_modules: name patterns (see `pattern_matches`); a single string is one regex over full names,
    as in peft. Raises ConfigError when a pattern matches nothing (naming the layers there are).
    Returns the model (the same object).
    """
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA needs r >= 1, alpha > 0 and dropout in [0, 1); got r={r}, alpha={alpha}, "
                          f"dropout={dropout}")
    chosen = select_layers(model, target_modules)
    for path in chosen:
        if isinstance(model.get_submodule(path), LoRALinear):
            raise ConfigError(f"{path} already has an adapter; merge it (merge_adapters) or start from the base")
    for p in model.parameters():
        p.requires_grad_(False)
    for path, slices in chosen.items():
        _set_module(model, path, LoRALinear(model.get_submodule(path), slices, r, alpha, dropout, dora))
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(path, module) of every adapter module swap in `model`."""
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLayer):
            yield name, mod


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes as its base: every adapter off (merged ones un-merged), then back.

    The DPO reference is this: the same weights with the adapters off, so one model serves as both.
    """
    layers = [m for _, m in adapter_layers(model)]
    merged = [m for m in layers if getattr(m, "merged", False)]
    before = [m.disabled for m in layers]
    for m in merged:
        m.unmerge()
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before, strict=True):
            m.disabled = d
        for m in merged:
            m.merge()


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (un-merge restores the base bit-exactly)."""
    for _, m in adapter_layers(model):
        m.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo `merge_adapters`: base weights back exactly as they were."""
    for _, m in adapter_layers(model):
        m.unmerge()
    return model
