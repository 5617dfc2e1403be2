"""Adapters on disk in `peft`'s format: adapter_config.json + adapter_model.safetensors.

Keys are peft's: `base_model.model.<Hugging Face module path>.lora_A.weight` (r, in), `.lora_B.weight`
(out, r), and DoRA's `.lora_magnitude_vector` (out,). One slice of our fused layers is one of those HF
modules (see `lora.linear_slices`), so `peft.PeftModel.from_pretrained(hf_model, folder)` loads what we
save and `load_adapter` reads what peft saves. The safetensors header also records the base model's
shape (`lmforge_base`), so an adapter put on a different base is refused with the difference named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.adapt.lora import LoRALinear, adapter_layers, apply_lora, linear_slices
from lmforge.errors import ConfigError, FormatError
from lmforge.io import write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _base_facts(model: nn.Module) -> dict[str, Any]:
    c = model.config
    return {"family": c.family, "d_model": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_kv_head": c.n_kv_head, "vocab_size": c.vocab_size}


def _lora_layers(model: nn.Module) -> list[LoRALinear]:
    layers = [m for _, m in adapter_layers(model) if isinstance(m, LoRALinear)]
    if not layers:
        raise ConfigError("this model has no LoRA adapters to save; apply_lora first")
    return layers


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under peft's keys."""
    out = {}
    for m in _lora_layers(model):
        for s in m.slices:
            out[f"{PREFIX}{s.hf_name}.lora_A.weight"] = m.lora_A[s.name].weight.detach()
            out[f"{PREFIX}{s.hf_name}.lora_B.weight"] = m.lora_B[s.name].weight.detach()
            if m.dora:
                out[f"{PREFIX}{s.hf_name}.lora_magnitude_vector"] = m.lora_magnitude[s.name].detach()
    return out


def save_adapter(model: nn.Module, folder: str | Path, base_name: str | None = None) -> Path:
    """Write the model's LoRA/DoRA adapters (not the base) as a peft adapter folder."""
    layers = _lora_layers(model)
    first = layers[0]
    if any((m.r, m.alpha, m.dora) != (first.r, first.alpha, first.dora) for m in layers):
        raise ConfigError("adapters with different r / alpha / DoRA settings per layer cannot be written as one "
                          "peft config")
    names = sorted({s.name for m in layers for s in m.slices})
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or
              model.config.name, "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
              "target_modules": names, "use_dora": first.dora, "bias": "none", "fan_in_fan_out":
              model.config.family == "gpt2", "inference_mode": True, "init_lora_weights": True,
              "use_rslora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {k: v.contiguous().cpu() for k, v in peft_state_dict(model).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt", "lmforge_base": json.dumps(_base_facts(model))})
    write_json(folder / CONFIG_FILE, config)
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json of a peft LoRA adapter folder, checked for what lmforge supports."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FormatError(f"{folder}: no {CONFIG_FILE}; not an adapter folder")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise FormatError(f"{path}: peft_type {cfg.get('peft_type')!r}; lmforge reads LORA adapters (LoRA, DoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise FormatError(f"{path}: per-layer {key} is not supported; use one r and lora_alpha for all layers")
    if cfg.get("use_rslora"):
        raise FormatError(f"{path}: use_rslora is not supported")
    if cfg.get("modules_to_save"):
        raise FormatError(f"{path}: modules_to_save ({cfg['modules_to_save']}) is not supported")
    if not cfg.get("target_modules"):
        raise FormatError(f"{path}: no target_modules")
    return cfg


def load_adapter(model: nn.Module, folder: str | Path, dropout: float | None = None) -> nn.Module:
    """Put the LoRA/DoRA adapter saved in `folder` (by lmforge or peft) on `model`; in place.

    Raises FormatError when the adapter does not fit this base (a layer it names is missing, a tensor's
    shape differs, or the recorded base shape differs), naming the difference.
    """
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FormatError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for truncated/corrupt files
        raise FormatError(f"{weights}: cannot read ({e}); the file is truncated or corrupt") from e
    if "lmforge_base" in meta:
        theirs, ours = json.loads(meta["lmforge_base"]), _base_facts(model)
        diff = [f"{k} {theirs[k]} (adapter) vs {ours.get(k)} (model)" for k in theirs if theirs[k] != ours.get(k)]
        if diff:
            raise FormatError(f"{folder}: the adapter was trained on a different base model: {'; '.join(diff)}")
    targets = cfg["target_modules"]
    # peft may save the names it matched, full paths or a regex; the keys say exactly which modules it adapted
    adapted = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(PREFIX)})
    if not adapted:
        raise FormatError(f"{weights}: no LoRA tensors (keys like {PREFIX}...lora_A.weight)")
    r = int(cfg["r"])
    known = {s.hf_name: (path, s) for path, sl in linear_slices(model).items() for s in sl}
    missing = [a for a in adapted if a not in known]
    if missing:
        raise FormatError(f"{folder}: the adapter adapts {missing[:3]}, which this {model.config.family} model "
                          f"does not have (target_modules {targets}): it belongs to a different base model")
    for key, t in tensors.items():  # every shape, before the model is touched
        name, _, kind = key[len(PREFIX):].rpartition(".lora_")
        path, s = known[name]
        layer = model.get_submodule(path)
        n_in = layer.in_features if hasattr(layer, "in_features") else layer.weight.shape[1]  # NF4: no float weight
        want = {"A.weight": (r, n_in), "B.weight": (s.size, r), "magnitude_vector": (s.size,)}.get(kind)
        if want is None:
            raise FormatError(f"{weights}: unexpected tensor {key}")
        if tuple(t.shape) != want:
            raise FormatError(f"{weights}: {key} has shape {tuple(t.shape)}, this model's layer needs {want}: "
                              "the adapter belongs to a different base model")
    apply_lora(model, r=r, alpha=float(cfg["lora_alpha"]),
               dropout=float(cfg.get("lora_dropout") or 0.0) if dropout is None else dropout,
               target_modules="|".join(re.escape(a) for a in adapted), dora=bool(cfg.get("use_dora")))
    slices = {s.hf_name: (m, s) for _, m in adapter_layers(model) if isinstance(m, LoRALinear) for s in m.slices}
    with torch.no_grad():
        for key, t in tensors.items():
            name, _, kind = key[len(PREFIX):].rpartition(".lora_")
            m, s = slices[name]
            if kind == "magnitude_vector":
                dest = m.lora_magnitude[s.name]
            else:
                dest = (m.lora_A if kind == "A.weight" else m.lora_B)[s.name].weight
            dest.copy_(t.to(dest.dtype))
    return model
