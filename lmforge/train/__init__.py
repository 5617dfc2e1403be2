"""Pre-training: one loop (`Trainer`) with pluggable objectives and batch sources, atomic checkpoints
that resume bit-identically, metrics and curves, and YAML recipes (`lmforge pretrain --config ...`).

    from lmforge.train import Trainer, TrainConfig, OptimConfig, CausalLM, TokenWindows
    result = Trainer(model, CausalLM(), TokenWindows(tokens, 16, 256), TrainConfig(), OptimConfig(),
                     run_dir="runs/x").fit(resume="auto")
"""

from lmforge.train.batches import BatchSource, PaddedSequences, TokenWindows, pad_sequences, shift_padded
from lmforge.train.objectives import CausalLM, Objective, build_objective
from lmforge.train.optim import OptimConfig, build_optimizer, lr_at
from lmforge.train.steps import TrainingDiverged, TrainResult
from lmforge.train.trainer import TrainConfig, Trainer

__all__ = [
    "BatchSource", "CausalLM", "Objective", "OptimConfig", "PaddedSequences", "TokenWindows", "TrainConfig",
    "TrainResult", "Trainer", "TrainingDiverged", "build_objective", "build_optimizer", "lr_at", "pad_sequences",
    "shift_padded",
]
