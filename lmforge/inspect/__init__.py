"""Looking inside a model: capture and interventions, attention maps, rollout and flow, head ablation, the logit
lens, attribution, linear probes, and their pictures, each in its own module.

Every analysis runs the model that `lmforge.load` gives, through `trace` (`lmforge.models.capture`): no wrapper,
no copy of the architecture, so what is inspected is what is served.
"""

from lmforge.inspect.ablation import HeadAblation, head_ablation
from lmforge.inspect.attention import attention_flow, attention_maps, rollout
from lmforge.inspect.attribution import Attribution, gradient_x_input, integrated_gradients, saliency
from lmforge.inspect.lens import LogitLens, lens_logits, logit_lens
from lmforge.inspect.probes import ProbeResult, layer_features, probe_layers, train_probe
from lmforge.inspect.probing_data import PROBING_TASKS, ProbingSet, build_probing_set
from lmforge.inspect.render import (
    heatmap_png,
    save_attention,
    save_attribution,
    save_head_ablation,
    save_lens,
    save_probes,
    save_rollout,
)
from lmforge.models.capture import (
    Interventions,
    Trace,
    capturing,
    encode_inputs,
    layer_stack,
    target_id,
    token_strings,
    trace,
    unwrap,
)

__all__ = [
    "HeadAblation", "Interventions", "LogitLens", "Trace", "attention_flow", "attention_maps", "capturing",
    "encode_inputs", "head_ablation", "layer_stack", "lens_logits", "logit_lens", "rollout", "target_id",
    "token_strings", "trace", "unwrap",
    "heatmap_png", "save_attention", "save_attribution", "save_head_ablation", "save_lens", "save_probes",
    "save_rollout", "PROBING_TASKS", "ProbeResult", "ProbingSet", "build_probing_set", "layer_features",
    "probe_layers", "train_probe", "Attribution", "gradient_x_input", "integrated_gradients", "saliency",
]
