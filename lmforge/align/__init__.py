"""Alignment: preference objectives (DPO, IPO, SimPO, ORPO), a reward model, PPO, for the one trainer.

Each method is an `Objective` (`lmforge.train.objectives`) plus, where it needs one, a batch source;
`build_objective("dpo" | "ipo" | "simpo" | "orpo" | "reward" | "ppo")` finds them by name.
"""

from lmforge.align.data import Pair, PreferencePairs, collate, read_jsonl, tokenize_pairs
from lmforge.align.dpo import DPO, preference_loss
from lmforge.align.logps import Reference, sequence_logps, token_logps
from lmforge.align.reward import RewardModel, RewardObjective, rewards

__all__ = ["DPO", "Pair", "PreferencePairs", "Reference", "RewardModel", "RewardObjective", "collate",
           "preference_loss", "read_jsonl", "rewards", "sequence_logps", "token_logps", "tokenize_pairs"]
