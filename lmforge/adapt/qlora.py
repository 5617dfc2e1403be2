"""QLoRA (Dettmers et al. 2023): the base model's linear layers frozen in 4-bit NF4, LoRA adapters on top.

The NF4 layer is the one `lmforge.quant.NF4Linear` (shared with `lmforge quantize`); here it is only
swapped in. The LM head and the embeddings stay in full precision (as bitsandbytes' QLoRA leaves them):
the head is tied to the embedding table in many small models, and its logits set the loss's precision.
In backward the base weight is rebuilt from its codes rather than kept (`lora._FrozenDequantLinear`).
"""

from __future__ import annotations

from torch import nn

from lmforge.adapt.lora import AdapterLayer, apply_lora, select_layers


def quantize_base(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                  skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every `nn.Linear` of `model` (except `skip`) by a frozen `NF4Linear`, in place; how many."""
    from lmforge.quant import NF4Linear

    paths = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip
             and not any(n.startswith(a + ".") for a, mm in model.named_modules() if isinstance(mm, AdapterLayer))]
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, NF4Linear.from_linear(getattr(owner, leaf), blocksize=blocksize,
                                                   double_quant=double_quant))
    return len(paths)


def apply_qlora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
                blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """NF4 base + LoRA on `target_modules`, in place. The targets are checked before anything changes."""
    select_layers(model, target_modules)  # ConfigError naming the layers if a pattern matches nothing
    quantize_base(model, blocksize, double_quant)
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
