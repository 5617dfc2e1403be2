"""Transforming trained models without quantisation: pruning (unstructured, 2:4, heads, MLP channels),
knowledge distillation into a smaller student, with before / after reports, and merging fine-tunes of one
base (`lmforge.compress.merging`)."""

from lmforge.compress.prune import (
    head_importance,
    magnitude_prune,
    mlp_importance,
    prune_heads,
    prune_mlp,
    semi_structured_prune,
    sparsity_report,
)

__all__ = ["head_importance", "magnitude_prune", "mlp_importance", "prune_heads", "prune_mlp",
           "semi_structured_prune", "sparsity_report"]
