"""Looking inside a model: capture, attention, head ablation, logit lens, attribution, probes; and their pictures."""

from lmforge.inspect.render import (
    heatmap_png,
    save_attention,
    save_attribution,
    save_head_ablation,
    save_lens,
    save_probes,
    save_rollout,
)
from lmforge.inspect.run import ANALYSES, analyze

__all__ = ["ANALYSES", "analyze", "heatmap_png", "save_attention", "save_attribution", "save_head_ablation",
           "save_lens", "save_probes", "save_rollout"]
