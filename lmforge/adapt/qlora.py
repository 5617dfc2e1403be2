"""QLoRA (Dettmers et al. 2023): the base model's linear layers frozen in 4-bit NF4, LoRA adapters on top.

The NF4 layer is the one `lmforge.quant.NF4Linear` (shared with `lmforge quantize`); here it is only
swapped in. The LM head and the embeddings stay in full precision (as bitsandbytes' QLoRA leaves them):
the head is tied to the embedding table in many small models, and its logits set the loss's precision.

Where the memory goes (SmolLM2-135M, batch 2 x 256, fp32; bench/finetune.py): the NF4 base is 174 MB
against 521 MB of fp32 weights, but without recomputation each of the 30 blocks keeps about 26 MB of
activations for backward (780 MB), so 4-bit weights alone gave 0.96x LoRA's peak. Hence, as in the paper
and peft's `prepare_model_for_kbit_training`:
- activation checkpointing is on by default (each block's activations recomputed in backward);
- the base weight is rebuilt from its codes in backward rather than kept (`lora._FrozenDequantLinear`);
- a model whose linears are already quantized (a GGUF file loaded natively) is converted one layer at a
  time, so the full fp32 model never exists in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.adapt.lora import AdapterLayer, apply_lora, select_layers


def _float_linear(layer: nn.Module) -> nn.Linear:
    """A frozen fp32 `nn.Linear` holding a quantized layer's weights."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    lin.weight = nn.Parameter(layer.dequantize(torch.float32), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
    return lin


def quantize_base(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                  skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every linear layer of `model` (except `skip`) by a frozen `NF4Linear`, in place; how many.

    Linears that are already quantized some other way (Int4Linear / Q8Linear from a GGUF file) are
    re-quantized to NF4 from their dequantized weights, one at a time; skipped ones (the LM head) and a
    quantized tied embedding become float again.
    """
    from lmforge.quant import NF4Linear
    from lmforge.quant.linear import QuantEmbedding, QuantLinear

    emb, head = getattr(model, "tok_emb", None), getattr(model, "lm_head", None)
    if isinstance(emb, QuantEmbedding):  # a tied head's quantized table: float again, head and embedding one
        float_head = _float_linear(emb.table)
        if emb.table is head:
            model.lm_head = float_head
        model.tok_emb = nn.Embedding(emb.num_embeddings, emb.embedding_dim, device="meta")
        model.tok_emb.weight = float_head.weight
    inside = [a + "." for a, mm in model.named_modules() if isinstance(mm, AdapterLayer)]
    paths = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))
             and not any(n.startswith(a) for a in inside)]
    n_quant = 0
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, leaf)
        if path in skip:
            if isinstance(layer, QuantLinear):
                setattr(owner, leaf, _float_linear(layer))
            continue
        if isinstance(layer, QuantLinear):
            layer = _float_linear(layer)  # the fp32 weight of this one layer only
        setattr(owner, leaf, NF4Linear.from_linear(layer, blocksize=blocksize, double_quant=double_quant))
        n_quant += 1
    if getattr(model, "quantization", None) is not None:  # a native GGUF load's layer map no longer applies
        model.quantization = None
    return n_quant


def apply_qlora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
                blocksize: int = 64, double_quant: bool = True, activation_checkpointing: bool = True) -> nn.Module:
    """NF4 base + LoRA on `target_modules`, in place. The targets are checked before anything changes.

    activation_checkpointing: recompute each block's activations in backward (QLoRA's and peft's default;
    without it activations, not weights, set the peak). Applies to models that support it (`DecoderLM`).
    """
    select_layers(model, target_modules)  # ConfigError naming the layers if a pattern matches nothing
    quantize_base(model, blocksize, double_quant)
    if activation_checkpointing and hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = True
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
