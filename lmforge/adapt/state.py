"""Adapter bookkeeping: which parameters train, and the base / adapter halves of a model's state."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.adapt.lora import AdapterLayer, adapter_layers


def trainable_parameters(model: nn.Module) -> dict[str, Any]:
    """{"trainable", "total", "percent", "adapter_layers"}: parameters that receive gradients vs all
    (shared tensors, such as tied embeddings, counted once; a quantized layer counts the weights it holds)."""
    total = trainable = 0
    for p in model.parameters():  # each Parameter once: tied weights are not counted twice
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    for m in model.modules():  # a quantized layer's weight is a buffer of codes: count the weights it stands for
        if callable(getattr(m, "dequantize", None)) and hasattr(m, "in_features"):
            total += m.in_features * m.out_features
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(total, 1), 4),
            "adapter_layers": sum(1 for _ in adapter_layers(model))}


def format_trainable(report: dict[str, Any]) -> str:
    """One line: 'trainable 12,288 of 1,234,567 parameters (0.9953%), 8 adapted layers'."""
    return (f"trainable {report['trainable']:,} of {report['total']:,} parameters ({report['percent']:.4f}%), "
            f"{report['adapter_layers']} adapted layers")


def has_adapters(model: nn.Module) -> bool:
    """Whether any adapter module swap is in `model`."""
    return next(adapter_layers(model), None) is not None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own tensors, keyed by their path in `model` (e.g. blocks.0.attn.qkv.lora_A.q_proj.weight)."""
    out = {}
    for path, layer in adapter_layers(model):
        for name, p in layer.adapter_parameters():
            out[f"{path}.{name}"] = p.detach()
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the base model under its usual keys: adapters left out, merged weights un-merged.

    What a plain `DecoderLM` of the same config loads (`LLM.save` writes this beside the adapter files).
    A quantized base (QLoRA) is written as its dequantized weights: exactly the values it computes with,
    and quantizing them again gives the same codes.
    """
    sd = model.state_dict()
    for path, layer in adapter_layers(model):
        prefix = path + "."
        for k in [k for k in sd if k.startswith(prefix)]:
            v = sd.pop(k)
            rest = k[len(prefix):]
            if getattr(layer, "quantized", False):  # NF4 codes etc.: the weight they stand for, once
                if rest == "base.bias":
                    sd[prefix + "bias"] = v
                elif prefix + "weight" not in sd:
                    sd[prefix + "weight"] = layer.base_weight().detach()
            elif rest.startswith("base."):
                saved = getattr(layer, "_saved", None)
                sd[prefix + rest[5:]] = saved if rest == "base.weight" and saved is not None else v
    adapted = [path + "." for path, _ in adapter_layers(model)]
    for path, m in model.named_modules():  # QLoRA's NF4 layers that carry no adapter: their float weight too
        if isinstance(m, AdapterLayer) or not callable(getattr(m, "dequantize", None)) or not hasattr(m, "codes") \
                or any(path.startswith(a) for a in adapted):
            continue
        prefix = path + "."
        for k in [k for k in sd if k.startswith(prefix) and k != prefix + "bias"]:
            sd.pop(k)
        sd[prefix + "weight"] = m.dequantize().detach()
    return sd
