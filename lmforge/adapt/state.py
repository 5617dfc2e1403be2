"""Adapter bookkeeping: which parameters train, and the base / adapter halves of a model's state."""

from __future__ import annotations

import hashlib
from pathlib import Path
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


def check_fingerprint(folder: Path, ref: dict, model: nn.Module) -> None:
    """FormatError when `model` (base from `ref["source"]`, adapters put back) is not the model whose
    frozen tensors `ref["fingerprint"]` describes: the base changed since the folder was written."""
    from lmforge.errors import FormatError

    if not ref.get("fingerprint"):
        return
    ours = base_fingerprint(model)["fingerprint"]
    if ours != ref["fingerprint"]:
        raise FormatError(f"{folder}: holds adapters only, and its base {ref.get('source')!r} is no longer the one "
                          f"they were trained on (fingerprint {ours}, recorded {ref['fingerprint']}); load it with "
                          "the original base")


# ---- adapter-only checkpoints: what trains, and a fingerprint of what does not -------------------

def _quantized_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{n}." for n, m in model.named_modules() if callable(getattr(m, "dequantize", None)))


def split_state(model: nn.Module) -> tuple[list[str], list[str]]:
    """(keys that training changes, frozen keys) of `model.state_dict()`.

    Changing: parameters with requires_grad and persistent buffers (an adapter's running statistics),
    except the buffers of quantized layers (a QLoRA base's NF4 codes), which are frozen by construction.
    """
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    quant = _quantized_prefixes(model)
    live, frozen = [], []
    for k, v in model.state_dict(keep_vars=True).items():
        changes = v.requires_grad if k in params else not k.startswith(quant)
        (live if changes else frozen).append(k)
    return live, frozen


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter-only checkpoint stores (see `split_state`), detached, on the CPU."""
    sd = model.state_dict()
    return {k: sd[k].detach().cpu().contiguous() for k in split_state(model)[0]}


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """{"fingerprint", "tensors", "elements"} of the frozen tensors: blake2b over their sorted keys, dtypes,
    shapes and bytes (~1 s for SmolLM2's 135M weights). Equal fingerprints mean bit-identical bases."""
    sd = model.state_dict()
    frozen = sorted(split_state(model)[1])
    h = hashlib.blake2b(digest_size=16)
    elements = 0
    seen: dict[tuple, str] = {}  # a tied table (embedding = LM head) is hashed once
    for k in frozen:
        t = sd[k].detach()
        h.update(f"{k}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)};".encode())
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if ident in seen:
            h.update(f"={seen[ident]};".encode())
            continue
        seen[ident] = k
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elements += t.numel()
    return {"fingerprint": h.hexdigest(), "tensors": len(frozen), "elements": elements}
