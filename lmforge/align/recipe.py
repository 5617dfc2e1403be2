"""Alignment's part of a recipe: the `align` section's checks, its data kinds and its objective.

Data kinds (`lmforge.train.recipe.DATA_KINDS`): `preferences` (prompt / chosen / rejected JSONL: the shipped
set built from the embedded corpus, `data.source: shakespeare-prefs`, or a file) and `prompts` (the same
records' prompts, for PPO's rollouts). `build_objective_for` gives the run builder the `align.method`'s
objective (DPO and its variants, a reward model, PPO); `reward_fn` gives PPO its reward.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from torch import nn

from lmforge.align.config import METHODS
from lmforge.align.data import PreferencePairs, collate, read_jsonl, tokenize_pairs
from lmforge.errors import ConfigError

PREFERENCE_SETS = ("shakespeare-prefs",)  # shipped sets (lmforge.data.instruct.BUILTIN)


def preference_records(source: str, split: str, val_fraction: float = 0.05) -> list[dict]:
    """Records of a split: a shipped set's prefs_<split>.jsonl, or a JSONL file split by `val_fraction`."""
    from lmforge.data.corpus import data_root
    from lmforge.data.instruct import BUILTIN

    if source in PREFERENCE_SETS:
        folder, prefix = BUILTIN[source]
        path = data_root() / folder / f"{prefix}{split}.jsonl"
        return read_jsonl(path) if path.is_file() or split == "train" else []
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"data.source {source!r}: not a shipped preference set ({', '.join(PREFERENCE_SETS)}) and "
                          "no such JSONL file (one {prompt, chosen, rejected} object per line)")
    recs = read_jsonl(path)
    n_val = int(len(recs) * val_fraction)
    if split == "train":
        return recs[:len(recs) - n_val]
    return recs[len(recs) - n_val:] if split == "val" else []


def _use_chat(recipe, tok) -> bool:
    return recipe.align.chat and hasattr(tok, "apply_chat_template")


def preference_data(recipe, tok, run_dir: Path, seq_len: int):
    """`data.kind: preferences`: tokenised preference pairs, shuffled per epoch (`PreferencePairs`)."""
    from lmforge.train.run import RunData

    t, dt = recipe.train, recipe.data
    pad = _pad_id(tok)
    max_len = seq_len + 1  # a row of L tokens feeds L - 1 inputs
    chat = _use_chat(recipe, tok)
    pairs = {s: tokenize_pairs(recs, tok, chat=chat, max_len=max_len, source=f"{dt.source} ({s})")
             if (recs := preference_records(dt.source, s, dt.val_fraction)[:dt.max_sequences]) else []
             for s in ("train", "val", "test")}
    source = PreferencePairs(pairs["train"], t.batch_size, pad, seed=t.seed,
                             val_pairs=pairs["val"][:t.eval_batches * t.batch_size])
    test = pairs["test"]
    test_batches = (lambda: (collate(test[i:i + t.batch_size], pad) for i in range(0, len(test), t.batch_size))) \
        if test else None
    return RunData(source, test_batches, None, {"train_pairs": len(pairs["train"]), "val_pairs": len(pairs["val"]),
                                                "test_pairs": len(test), "chat_template": chat,
                                                "steps_per_epoch": source.steps_per_epoch})


def prompt_data(recipe, tok, run_dir: Path, seq_len: int):
    """`data.kind: prompts`: PPO rollouts from the records' prompts (bound to the policy by `align`)."""
    from lmforge.align.ppo import Rollouts
    from lmforge.train.run import RunData

    a, dt = recipe.align, recipe.data
    chat = _use_chat(recipe, tok)

    def encode(recs: list[dict]) -> list[list[int]]:
        out = []
        for r in recs[:dt.max_sequences]:
            p = r.get("prompt") if isinstance(r, dict) else None
            if not isinstance(p, str) or not p.strip():
                raise ConfigError(f"{dt.source}: a record without a prompt string; prompts need {{\"prompt\": ...}}")
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) if chat \
                else p
            ids = tok.encode(text, add_special_tokens=not chat)
            out.append(ids[-(seq_len - a.max_new_tokens):])  # room for the response in the context
        return out

    prompts = encode(preference_records(dt.source, "train", dt.val_fraction))
    val = encode(preference_records(dt.source, "val", dt.val_fraction))[:a.rollout_size * 2]
    eos = tuple(i for t_ in ("<|im_end|>",) if (i := tok.token_to_id(t_)) is not None) + \
        ((tok.eos_id,) if tok.eos_id is not None else ())
    source = Rollouts(None, None, prompts, None, rollout_size=a.rollout_size, minibatch_size=a.minibatch_size,
                      ppo_epochs=a.ppo_epochs, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                      top_k=a.top_k, eos_ids=eos, pad_id=_pad_id(tok), seed=recipe.train.seed, val_prompts=val)
    return RunData(source, None, None, {"prompts": len(prompts), "val_prompts": len(val), "chat_template": chat})


def _pad_id(tok) -> int:
    for i in (tok.pad_id, tok.eos_id):
        if i is not None:
            return i
    return 0


def check_recipe(recipe) -> None:
    """The `align` section's values and their fit with the data kind and adapter (ConfigError naming the fix)."""
    a, dt = recipe.align, recipe.data

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(a.method in METHODS, f"align.method must be one of {list(METHODS)}, got {a.method!r}")
    want = "prompts" if a.method == "ppo" else "preferences"
    need(dt.kind == want, f"align.method {a.method} reads data.kind: {want}, the recipe has {dt.kind!r}")
    need(a.beta > 0, f"align.beta must be > 0, got {a.beta}")
    need(0 <= a.label_smoothing < 0.5, f"align.label_smoothing must be in [0, 0.5), got {a.label_smoothing}")
    need(a.reference is None or Path(a.reference).is_dir(), f"align.reference {a.reference}: no such model folder")
    if a.method == "ppo":
        need(a.reward_model is not None or a.reward_token is not None, "align.method ppo needs a reward: "
             "align.reward_model (a folder from `lmforge align --method reward`) or align.reward_token (toy)")
        need(a.reward_model is None or Path(a.reward_model).is_dir(), f"align.reward_model {a.reward_model}: no "
             "such folder; train one with `lmforge align --method reward`")
        need(a.rollout_size % a.minibatch_size == 0, f"align.rollout_size ({a.rollout_size}) must be a multiple "
             f"of align.minibatch_size ({a.minibatch_size})")
        need(a.max_new_tokens >= 1 and a.ppo_epochs >= 1, "align.max_new_tokens and align.ppo_epochs must be >= 1")
    if dt.source not in PREFERENCE_SETS:
        need(Path(dt.source).is_file(), f"data.source {dt.source!r}: not a shipped preference set "
             f"({', '.join(PREFERENCE_SETS)}) and no such JSONL file")


def _reference(recipe, model: nn.Module) -> nn.Module | None:
    """None (adapters off) under LoRA; else the named model, or a frozen copy of the starting weights."""
    a = recipe.align
    if a.reference is not None:
        from lmforge.llm import load

        return load(a.reference).model
    if recipe.adapter.method != "full":
        return None
    print("align: full fine-tuning keeps a frozen copy of the starting model as the reference (two models in "
          "memory); use adapter.method: lora for one", file=sys.stderr)
    return copy.deepcopy(model)


def build_objective_for(recipe, model: nn.Module):
    """The `align.method`'s objective for `model`."""
    from lmforge.align.dpo import DPO
    from lmforge.align.ppo import PPO
    from lmforge.align.reward import RewardObjective

    a = recipe.align
    d = model.config.d_model
    if a.method == "reward":
        return RewardObjective(d_model=d, center=a.center)
    if a.method == "ppo":
        return PPO(d_model=d, clip=a.clip, clip_value=a.clip_value, vf_coef=a.vf_coef, kl_coef=a.kl_coef,
                   gamma=a.discount, lam=a.gae_lambda, reference=_reference(recipe, model))
    ref = None if a.method in ("simpo", "orpo") else _reference(recipe, model)
    return DPO(a.method, beta=a.beta, gamma=a.gamma, lam=a.lam, label_smoothing=a.label_smoothing, reference=ref)


def reward_fn(recipe, tok):
    """PPO's reward: the `align.reward_model`'s score, or the count of `align.reward_token` (a toy)."""
    from lmforge.align.ppo import RewardModelScore, TokenCountReward

    a = recipe.align
    if a.reward_model is not None:
        from lmforge.align.reward import RewardModel

        return RewardModelScore(RewardModel.load(a.reward_model))
    ids = tok.encode(a.reward_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"align.reward_token {a.reward_token!r} is {len(ids)} tokens; give a single token")
    return TokenCountReward(ids[0])
