"""Parameter-efficient adaptation as module swaps on the one model: nothing is copied, the base stays.

    from lmforge.adapt import apply_lora, disable_adapters, merge_adapters, unmerge_adapters
    model = lmforge.load("smollm2").model
    apply_lora(model, r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])  # in place
    trainable_parameters(model)   # {"trainable": 460_800, "total": 134_975_808, "percent": 0.3414, ...}
    with disable_adapters(model):  # the base model (e.g. DPO's reference): same weights, adapters off
        ref_logits = model(ids)
    merge_adapters(model)          # fold B A into W for inference; unmerge_adapters restores W bit-exactly
    save_adapter(model, "out/")    # peft's adapter_config.json + adapter_model.safetensors
    load_adapter(base_model, "out/")   # ours or peft's, onto a model of the same base

`apply_lora(model, r, alpha, dropout, target_modules, dora=False)` swaps each matching linear layer
for a `LoRALinear` (DoRA with `dora=True`) and freezes every other parameter. Target patterns use
peft's rule over Hugging Face layer names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj; GPT-2 c_attn, c_fc, c_proj) or our module paths (attn.qkv, mlp.fc); a pattern matching
nothing is a `ConfigError` that lists the names. Fused layers (our qkv, gate+up) get one adapter per
slice, as peft builds on the separate HF projections, so outputs and files match peft's.

`apply_bottleneck_adapters(model, r)` adds Houlsby adapters after each residual projection (saved in
lmforge's own lmforge_adapter.* files: peft has no such method).

`apply_prompt_tuning(model, n)` / `apply_prefix_tuning(model, n)` add n learned virtual tokens (input
embeddings, or per-layer keys/values) through `model.virtual_tokens`, also lmforge-format files.

`apply_adalora(model, total_steps, r, target_r)` puts SVD-form adapters whose rank budget moves between
layers by importance over training (the schedule lives at `model.adalora`; lmforge-format files).

`apply_adapter(model, AdapterConfig)` is what recipes use (`adapter:` section, `lmforge finetune`).
`LLM.save` writes an adapted model as its base weights plus the adapter files; `lmforge.load` of such a
folder puts the adapter back on.
"""

from __future__ import annotations

from torch import nn

from lmforge.adapt.adalora import AdaLoRALinear, apply_adalora
from lmforge.adapt.bottleneck import BottleneckAdapter, apply_bottleneck_adapters
from lmforge.adapt.config import METHODS, AdapterConfig
from lmforge.adapt.lora import (
    AdapterLayer,
    LoRALinear,
    adapter_layers,
    apply_lora,
    disable_adapters,
    linear_slices,
    merge_adapters,
    unmerge_adapters,
)
from lmforge.adapt.peft_io import load_adapter, read_adapter_config, save_adapter
from lmforge.adapt.qlora import apply_qlora, quantize_base
from lmforge.adapt.state import (
    adapter_state_dict,
    base_state_dict,
    format_trainable,
    has_adapters,
    trainable_parameters,
)
from lmforge.adapt.virtual import PrefixTuning, PromptTuning, apply_prefix_tuning, apply_prompt_tuning
from lmforge.errors import ConfigError


def apply_adapter(model: nn.Module, cfg: AdapterConfig, total_steps: int | None = None) -> nn.Module:
    """Adapt `model` in place as the recipe's `adapter` section says (`full`: unchanged, all trainable).

    total_steps: the run's training forwards (AdaLoRA's rank schedule spans them).
    """
    if cfg.method == "full":
        return model
    if cfg.path is not None:
        load_adapter(model, cfg.path, dropout=cfg.dropout)
        for _, layer in adapter_layers(model):
            for _, p in layer.adapter_parameters():
                p.requires_grad_(True)
        return model
    if cfg.method in ("lora", "dora"):
        return apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                          dora=cfg.method == "dora")
    if cfg.method == "adalora":
        if total_steps is None:
            raise ConfigError("AdaLoRA needs the run's number of steps for its rank schedule")
        return apply_adalora(model, total_steps, r=cfg.r, target_r=cfg.target_r or max(1, 2 * cfg.r // 3),
                             alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                             interval=cfg.interval)
    if cfg.method in ("prompt", "prefix"):
        return (apply_prompt_tuning if cfg.method == "prompt" else apply_prefix_tuning)(model, cfg.num_virtual_tokens)
    if cfg.method == "adapter":
        return apply_bottleneck_adapters(model, r=cfg.r, dropout=cfg.dropout)
    if cfg.method == "qlora":
        return apply_qlora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                           blocksize=cfg.quant_blocksize, double_quant=cfg.double_quant,
                           activation_checkpointing=cfg.activation_checkpointing)
    raise ConfigError(f"adapter.method {cfg.method!r} is not available; choose one of {', '.join(METHODS)}")


__all__ = ["METHODS", "AdaLoRALinear", "AdapterConfig", "AdapterLayer", "BottleneckAdapter", "LoRALinear",
           "PrefixTuning", "PromptTuning", "adapter_layers", "adapter_state_dict", "apply_adalora", "apply_adapter",
           "apply_bottleneck_adapters", "apply_lora", "apply_prefix_tuning", "apply_prompt_tuning", "apply_qlora",
           "base_state_dict", "disable_adapters", "format_trainable", "has_adapters", "linear_slices",
           "load_adapter", "merge_adapters", "quantize_base", "read_adapter_config", "save_adapter",
           "trainable_parameters", "unmerge_adapters"]
