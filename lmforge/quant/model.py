"""`quantize(model, method)`: swap a model's `nn.Linear`s for quantized ones, and rebuild that structure on load.

A quantized model carries `model.quantization` = {"method": ..., options..., "layers": {name: layer info}}:
what `LLM.save` writes into lmforge.json / config.json so that loading rebuilds the same layers and fills
them from the saved buffers (no re-quantizing). With tied embeddings, the quantized LM head also serves
the token embedding (`QuantEmbedding`), so the vocabulary table is held once, quantized, as llama.cpp does.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError, FormatError
from lmforge.quant.int4_layout import CANONICAL, convert_int4, int4_layout
from lmforge.quant.int8 import Int8Linear
from lmforge.quant.linear import (
    GROUP_SIZES,
    Int4Linear,
    Q8Linear,
    QuantEmbedding,
    QuantLinear,
    _Int4Kernel,
    check_group,
)
from lmforge.quant.nf4 import NF4Linear

METHODS = ("int8", "int4", "nf4", "q8_0")
QUANT_TYPES = (QuantLinear, NF4Linear)


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of `model` is already a quantized (or ternary) layer."""
    from lmforge.quant.ternary import BitLinear, TernaryLinear

    return any(isinstance(m, (*QUANT_TYPES, QuantEmbedding, BitLinear, TernaryLinear)) for m in model.modules())


def layer_info(layer: nn.Module) -> dict:
    """The options that rebuild `layer` empty: {"method": ..., ...}."""
    if isinstance(layer, NF4Linear):
        return {"method": "nf4", "blocksize": layer.blocksize, "double_quant": layer.double_quant}
    return layer.quant_info()


def empty_layer(info: dict, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """An unfilled quantized layer of the kind `info` names (from `layer_info`)."""
    m = info.get("method")
    if m == "int8":
        return Int8Linear(in_features, out_features, bias)
    if m == "int4":
        return Int4Linear(in_features, out_features, bias, group_size=int(info.get("group_size", 32)))
    if m == "q8_0":
        return Q8Linear(in_features, out_features, bias)
    if m == "nf4":
        return NF4Linear(in_features, out_features, bias, blocksize=int(info.get("blocksize", 64)),
                         double_quant=bool(info.get("double_quant", False)))
    raise FormatError(f"unknown quantized layer method {m!r}; lmforge knows {', '.join(METHODS)}")


def _quantize_layer(linear: nn.Linear, method: str, group_size: int, blocksize: int, double_quant: bool) -> nn.Module:
    if method == "int8":
        return Int8Linear.from_linear(linear)
    if method == "int4":
        return Int4Linear.from_linear(linear, group_size)
    if method == "q8_0":
        return Q8Linear.from_linear(linear)
    return NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    return [(parent, name, f"{pname}.{name}" if pname else name, child)
            for pname, parent in model.named_modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


def quantize(model: nn.Module, method: str, *, group_size: int = 32, blocksize: int = 64,
             double_quant: bool = False, lm_head: bool = True) -> nn.Module:
    """Replace every `nn.Linear` of `model` by a quantized layer, in place; returns the model.

    Args:
        model: a `DecoderLM` (or any module; tied-embedding handling needs `tok_emb` / `lm_head`).
        method: "int8" (per-channel), "int4" (group-wise asymmetric), "nf4" (block-wise NormalFloat) or
            "q8_0" (GGUF's 32-value blocks).
        group_size: int4 group along the input (32, 64 or 128); must divide every layer's input width.
        blocksize: NF4 block size. double_quant: NF4 with int8-quantised block scales.
        lm_head: quantize the LM head too (with tied embeddings the embedding then reads the same table).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if is_quantized(model):
        raise ConfigError("this model is already quantized; quantize the float model instead (load the "
                          "original checkpoint, or dequantize it with lmforge.quant.dequantize)")
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    # NF4 has no row lookup for the embedding: a tied head stays float (one table), as QLoRA keeps it
    lm_head = lm_head and not (tied and method == "nf4")
    targets = [t for t in _linears(model) if lm_head or t[2] != "lm_head"]
    if method == "int4":  # check every layer before changing any: a failure leaves the model as it was
        if group_size not in GROUP_SIZES:
            check_group(0, group_size)
        for *_, full, lin in targets:
            try:
                check_group(lin.in_features, group_size)
            except ConfigError as e:
                raise ConfigError(f"layer {full}: {e}") from None
    if method == "q8_0":
        for *_, full, lin in targets:
            check_group(lin.in_features, 32, f"q8_0 block ({full})")
    layers = {}
    for parent, name, full, lin in targets:
        q = _quantize_layer(lin, method, group_size, blocksize, double_quant)
        setattr(parent, name, q)
        layers[full] = layer_info(q)
    _tie_embedding(model, tied)
    opts = {"group_size": group_size} if method == "int4" else \
        {"blocksize": blocksize, "double_quant": double_quant} if method == "nf4" else {}
    model.quantization = {"method": method, **opts, "layers": layers}
    return model


def _tie_embedding(model: nn.Module, tied: bool) -> None:
    head = getattr(model, "lm_head", None)
    if tied and hasattr(head, "dequantize_rows") and isinstance(getattr(model, "tok_emb", None), nn.Embedding):
        model.tok_emb = QuantEmbedding(head, dtype=model.tok_emb.weight.dtype)


def restore(model: nn.Module, quantization: dict) -> nn.Module:
    """Give a freshly built float model the quantized layers `quantization["layers"]` names (empty, to be
    filled by `load_state_dict`), in place; returns the model."""
    layers = quantization.get("layers") or {}
    found = {full: (parent, name, lin) for parent, name, full, lin in _linears(model)}
    missing = [k for k in layers if k not in found]
    if missing:
        raise FormatError(f"the quantization info names layers the model does not have: {missing[:5]}")
    for full, info in layers.items():
        parent, name, lin = found[full]
        setattr(parent, name, empty_layer(info, lin.in_features, lin.out_features, lin.bias is not None))
    _tie_embedding(model, getattr(getattr(model, "config", None), "tie_embeddings", False))
    model.quantization = quantization
    return model


def quant_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors to save: quantized buffers as they are, float weights cast to `dtype` if given, and the
    tied embedding's table (the LM head's) once."""
    keep = _quant_keys(model)
    out = {}
    shared = isinstance(getattr(model, "tok_emb", None), QuantEmbedding) and model.tok_emb.table is model.lm_head
    head = getattr(model, "lm_head", None)
    tied_float = isinstance(head, nn.Linear) and head.weight is getattr(model.tok_emb, "weight", None)
    layouts = _packed_4bit(model)
    for k, v in model.state_dict().items():
        if (shared and k.startswith("tok_emb.table.")) or (tied_float and k == "lm_head.weight"):
            continue
        if dtype is not None and v.is_floating_point() and k not in keep:
            v = v.to(dtype)
        if k in layouts:  # files hold one layout on every machine
            v = convert_int4(v, *layouts[k], int4_layout(), CANONICAL)
        out[k] = v.detach().cpu().contiguous()
    return out


def _packed_4bit(model: nn.Module) -> dict[str, tuple[int, int]]:
    """State-dict keys of buffers in the 4-bit kernel's byte layout -> the layer's (out, in) features."""
    return {f"{name}.{b}": (m.out_features, m.in_features)
            for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, _Int4Kernel)
            for b in m.packed_names}


def _quant_keys(model: nn.Module) -> set[str]:
    """State-dict keys of quantized storage (codes, scales): never cast to another float dtype."""
    keys = set()
    for name, m in model.named_modules(remove_duplicate=False):  # the tied head under both its names
        if isinstance(m, QUANT_TYPES):
            keys |= {f"{name}.{b}" for b, _ in m.named_buffers(recurse=False)}
    return keys


def load_quantized_state(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
                         device: str | torch.device, source: str) -> nn.Module:
    """Fill a model built by `restore` from saved tensors (assigning, no copies where the dtype matches)."""
    keep = _quant_keys(model)
    shared = isinstance(getattr(model, "tok_emb", None), QuantEmbedding) and model.tok_emb.table is model.lm_head
    expected = {k: v for k, v in model.state_dict().items() if not (shared and k.startswith("tok_emb.table."))}
    if getattr(model.config, "tie_embeddings", False) and "lm_head.weight" in expected:
        expected.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise FormatError(f"{source}: saved tensors do not match the quantized model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    cast, layouts = {}, _packed_4bit(model)
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise FormatError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        want = expected[k].dtype if k in keep or not v.is_floating_point() else (dtype or v.dtype)
        v = v.to(device=device, dtype=want)
        if k in layouts and int4_layout() != CANONICAL:  # a fresh, aligned tensor in this machine's layout
            cast[k] = convert_int4(v, *layouts[k], CANONICAL, int4_layout())
            continue
        # the packed kernels read with aligned vector loads: give quantized storage its own fresh allocation
        # (a tensor read from safetensors can start anywhere; _weight_int8pack_mm crashed on one)
        cast[k] = v.clone() if k in keep else v
    model.load_state_dict(cast, strict=False, assign=True)
    if getattr(model.config, "tie_embeddings", False) and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.tok_emb.weight
    floats = [v.dtype for k, v in cast.items() if k not in keep and v.is_floating_point()]
    for m in model.modules():  # the embedding's dtype probe follows the model's float dtype
        if isinstance(m, QuantEmbedding):
            m.weight = m.weight.to(device=device, dtype=dtype or (floats[0] if floats else torch.float32))
    return model.to(device)


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace quantized layers by plain `nn.Linear`s holding their dequantized weights, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QUANT_TYPES):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")
                lin.weight = nn.Parameter(child.dequantize(dtype), requires_grad=False)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
                setattr(parent, name, lin)
    if isinstance(getattr(model, "tok_emb", None), QuantEmbedding):
        emb = nn.Embedding(model.tok_emb.num_embeddings, model.tok_emb.embedding_dim, device="meta")
        emb.weight = model.lm_head.weight if getattr(model.config, "tie_embeddings", False) else \
            nn.Parameter(model.tok_emb.table.dequantize(dtype))
        model.tok_emb = emb
    model.quantization = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model
