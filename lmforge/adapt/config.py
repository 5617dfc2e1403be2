"""`AdapterConfig`: the `adapter` section of a recipe (which parameter-efficient method, and its settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

METHODS = ("full", "lora", "dora", "qlora", "adalora", "adapter", "prefix", "prompt")


@dataclass
class AdapterConfig:
    """How a fine-tuning run adapts the model. `full` trains every weight; the others swap modules.

    target_modules are name patterns over the model's linear layers, matched as in `peft`: a pattern
    matches a layer whose name ends with it at a dot boundary (`q_proj`, `attn.proj`), or, when it holds
    regex characters, whose full name it matches. Names are the Hugging Face ones where the family has
    them (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-2: c_attn, attn.c_proj,
    c_fc, mlp.c_proj), so a peft adapter's target_modules mean the same layers here.
    """

    method: Literal["full", "lora", "dora", "qlora", "adalora", "adapter", "prefix", "prompt"] = "full"
    r: int = 8  # LoRA rank (AdaLoRA: the initial rank); bottleneck size for `adapter`
    target_r: int | None = None  # adalora: average rank at the end; null: 2/3 of r
    interval: int = 10  # adalora: steps between rank reallocations
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_virtual_tokens: int = 20  # prefix / prompt tuning
    quant_blocksize: int = 64  # qlora: weights per NF4 absmax block
    double_quant: bool = True  # qlora: int8-quantise the block scales too (QLoRA section 3)
    activation_checkpointing: bool = True  # qlora: recompute block activations in backward (QLoRA's default)
    path: str | None = None  # start from a saved adapter folder (adapter_config.json + adapter_model.safetensors)
