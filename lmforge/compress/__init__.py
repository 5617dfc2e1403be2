"""Making a model smaller without quantisation: pruning (unstructured, 2:4, heads, MLP channels) and
knowledge distillation into a smaller student, with before / after reports."""

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
