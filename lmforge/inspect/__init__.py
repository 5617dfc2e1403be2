"""Looking inside a model: linear probes of each layer's representation (more analyses merge in here)."""

from lmforge.inspect.probes import ProbeResult, layer_features, probe_layers, train_probe
from lmforge.inspect.probing_data import PROBING_TASKS, ProbingSet, build_probing_set

__all__ = ["PROBING_TASKS", "ProbeResult", "ProbingSet", "build_probing_set", "layer_features", "probe_layers",
           "train_probe"]
