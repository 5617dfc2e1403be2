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

__all__ = ["heatmap_png", "save_attention", "save_attribution", "save_head_ablation", "save_lens", "save_probes",
           "save_rollout"]
