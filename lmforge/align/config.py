"""`AlignConfig`: the `align` section of a recipe (which alignment method, and its settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

METHODS = ("dpo", "ipo", "simpo", "orpo", "reward", "ppo")


@dataclass
class AlignConfig:
    """Settings of `lmforge align`; each method reads the fields it needs.

    The DPO-family reference is the policy with its LoRA adapters off (`adapter.method: lora`), so one
    model is in memory; with full fine-tuning (`adapter.method: full`) it is a frozen copy of the starting
    model, or the model folder named by `reference`.
    """

    method: Literal["dpo", "ipo", "simpo", "orpo", "reward", "ppo"] = "dpo"
    beta: float = 0.1  # dpo / ipo: KL strength; simpo: reward scale
    gamma: float = 0.5  # simpo: target reward margin
    lam: float = 0.1  # orpo: weight of the odds-ratio term
    label_smoothing: float = 0.0  # dpo: assumed rate of flipped preference labels
    reference: str | None = None  # a frozen reference model folder (instead of adapters off / a copy)
    chat: bool = True  # render prompts with the tokenizer's chat template
    center: float = 0.0  # reward: weight of the reward-centering term
    # ppo
    reward_model: str | None = None  # folder written by `lmforge align --method reward` (with heads.safetensors)
    reward_token: str | None = None  # without a reward model: reward = count of this token in the response (toy)
    rollout_size: int = 16  # responses generated per round
    minibatch_size: int = 8  # rows per optimizer micro-batch
    ppo_epochs: int = 2  # passes over each round
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.05  # per-token KL penalty against the reference
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    discount: float = 1.0  # GAE gamma
    gae_lambda: float = 0.95
