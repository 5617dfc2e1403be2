"""Looking inside a model: capture and interventions, attention, head ablation, logit lens, attribution, probes."""

from lmforge.inspect.attribution import Attribution, gradient_x_input, integrated_gradients, saliency

__all__ = ["Attribution", "gradient_x_input", "integrated_gradients", "saliency"]
