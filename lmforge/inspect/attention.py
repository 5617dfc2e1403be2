"""Attention maps per layer and head, attention rollout and attention flow (Abnar & Zuidema 2020).

Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers": raw attention of a deep layer says little
about which input tokens a position draws on, since each layer mixes already-mixed representations. Both of
their methods model a layer as its head-averaged attention plus the residual connection,
A = 0.5 * W_att + 0.5 * I (rows renormalised), over a graph whose nodes are the positions at each layer:

- **rollout** follows all paths: the product A_L ... A_1, whose row i gives how much output position i draws
  on each input token;
- **flow** treats the A's as edge capacities and takes the maximum flow from each input token to one output
  position (they computed it with networkx; here an exact Edmonds-Karp on the layered graph, for short inputs).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import ConfigError
from lmforge.models.capture import Trace, check_index, check_layer

KINDS = ("self", "encoder", "cross")
# layers x tokens^2 edges: beyond this the exact max-flow takes more than a few seconds per input (30 layers x
# 32 tokens: ~4 s on one core; the time grows faster than the edges)
MAX_FLOW_EDGES = 40_000


def _maps(trace: Trace, kind: str) -> list:
    if kind not in KINDS:
        raise ConfigError(f"unknown attention kind {kind!r}; valid: {', '.join(KINDS)}")
    maps = {"self": trace.attention, "encoder": trace.encoder_attention, "cross": trace.cross_attention}[kind]
    if maps is None:
        raise ConfigError(f"{kind} attention exists only in an encoder-decoder; this trace is of a single stack")
    if not maps:
        raise ConfigError("this trace holds no attention: trace with capture=('attention', ...)")
    return maps


def _not_attention(trace: Trace, layer: int, kind: str) -> ConfigError:
    mixer = trace.mixers[layer] if kind != "encoder" and layer < len(trace.mixers) else "not attention"
    return ConfigError(f"layer {layer}'s token mixer is {mixer}: it has no attention maps (attention layers: "
                       f"{[i for i, m in enumerate(trace.mixers) if m == 'attention'] or 'none'})")


def attention_maps(trace: Trace, layer: int | None = None, head: int | None = None, *,
                   kind: str = "self") -> torch.Tensor:
    """Attention probabilities from a `Trace` (captured with "attention"), fp32.

    Args:
        trace: a `Trace` with attention.
        layer: a block index (negative counts from the end); None: every layer, stacked first.
        head: a head index; None: every head.
        kind: "self" (the decoder's or the model's own), "encoder" or "cross" (an encoder-decoder's).

    Returns (B, n_head, T, L) for one layer, (B, T, L) for one head of it, (n_layer, B, n_head, T, L) for
    layer None, (n_layer, B, T, L) for layer None and one head.
    """
    maps = _maps(trace, kind)
    if layer is None:
        missing = [i for i, a in enumerate(maps) if a is None]
        if missing:
            raise _not_attention(trace, missing[0], kind)
        out = torch.stack(maps)
        return out if head is None else out[:, :, check_index(head, out.shape[2], "head")]
    layer = check_layer(layer, len(maps))
    if maps[layer] is None:
        raise _not_attention(trace, layer, kind)
    a = maps[layer]
    return a if head is None else a[:, check_index(head, a.shape[1], "head")]


def _layer_graph(trace: Trace, row: int, add_residual: bool, kind: str) -> torch.Tensor:
    """(n_layer, T, T) float64: each layer's head-averaged attention of one row, with the residual added."""
    if kind == "cross":
        raise ConfigError("rollout and flow follow one stack's self-attention; cross-attention maps decoder "
                          "positions to encoder ones (use kind='self' or 'encoder')")
    maps = attention_maps(trace, kind=kind)  # (n_layer, B, nh, T, T)
    a = maps[:, check_index(row, maps.shape[1], "row")].double().mean(1)
    if add_residual:  # Abnar & Zuidema: 0.5 W_att + 0.5 I, then each row renormalised
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
    return a


def rollout(trace: Trace, *, add_residual: bool = True, row: int = 0, kind: str = "self") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): (T, T), row i = how much position i at the top draws on each input.

    Args:
        trace: a `Trace` with attention in every layer.
        add_residual: model the residual connection as 0.5 W_att + 0.5 I (the paper's choice).
        row: which row of the batch.
        kind: "self", or "encoder" for an encoder-decoder's encoder.
    """
    a = _layer_graph(trace, row, add_residual, kind)
    out = a[0]
    for layer in a[1:]:
        out = layer @ out
    return out.float()


def attention_flow(trace: Trace, *, row: int = 0, source: int | None = None, add_residual: bool = True,
                   kind: str = "self") -> torch.Tensor:
    """Attention flow (Abnar & Zuidema 2020): (T,) the maximum flow from each input token to one output position.

    The graph has a node per position and layer (inputs at layer 0); layer l's attention (head-averaged, with the
    residual when `add_residual`) gives the capacity of the edge from input position j to position i above it.

    Args:
        trace: a `Trace` with attention in every layer.
        row: which row of the batch.
        source: the output position at the top layer (default: the last).
        add_residual: as in `rollout`.
        kind: "self", or "encoder" for an encoder-decoder's encoder.
    """
    a = _layer_graph(trace, row, add_residual, kind).cpu().numpy()
    n, T = a.shape[0], a.shape[1]
    source = T - 1 if source is None else source + T if isinstance(source, int) and -T <= source < 0 else source
    check_index(source, T, "position")
    if n * T * T > MAX_FLOW_EDGES:
        raise ConfigError(f"attention flow is an exact max-flow over {n} layers x {T}^2 edges; it takes at most "
                          f"{MAX_FLOW_EDGES} ({int((MAX_FLOW_EDGES / n) ** 0.5)} tokens for {n} layers): use a "
                          "shorter text, or rollout")
    cap = np.zeros(((n + 1) * T, (n + 1) * T))
    for layer in range(n):  # edge (layer, j) -> (layer + 1, i) with capacity a[layer][i, j]
        cap[layer * T:(layer + 1) * T, (layer + 1) * T:(layer + 2) * T] = a[layer].T
    sink = n * T + source
    return torch.tensor([max_flow(cap, j, sink) for j in range(T)], dtype=torch.float32)


def max_flow(cap: np.ndarray, s: int, t: int, eps: float = 1e-12) -> float:
    """The maximum flow value from node s to node t of a graph with capacities `cap` (N, N), by Edmonds-Karp.

    Edmonds & Karp 1972, "Theoretical Improvements in Algorithmic Efficiency for Network Flow Problems": augment
    along a shortest path of the residual graph until none is left (at most N * E augmentations, real capacities
    included). The breadth-first search runs a frontier at a time over the dense residual matrix.
    """
    res = cap.astype(np.float64, copy=True)
    total = 0.0
    while True:
        parent = np.full(len(res), -1)
        parent[s] = s
        frontier = np.array([s])
        while frontier.size and parent[t] < 0:
            open_ = res[frontier] > eps  # (frontier, N): residual edges out of the frontier
            open_[:, parent >= 0] = False
            nodes = np.flatnonzero(open_.any(0))
            parent[nodes] = frontier[open_[:, nodes].argmax(0)]
            frontier = nodes
        if parent[t] < 0:
            return total
        path, v = [], t
        while v != s:
            path.append((parent[v], v))
            v = parent[v]
        u, v = np.array(path).T
        push = res[u, v].min()
        res[u, v] -= push
        res[v, u] += push
        total += push
