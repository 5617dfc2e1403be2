"""Pruning: remove weights a model can do without.

- `magnitude_prune`: unstructured; zero the `sparsity` fraction of smallest-|w| entries of every block
  linear (Han et al. 2015), per layer or over all layers at once. Shapes stay; the zeros only pay off
  with a sparse kernel or compression.
- `semi_structured_prune`: N:M (2:4 by default; Mishra et al. 2021): in every group of M consecutive
  input weights of a row, keep the N largest. The pattern sparse tensor cores run at 2x; on a CPU it is
  stored dense.
- `prune_heads` / `prune_mlp`: structured; drop whole attention heads (whole KV groups under GQA) or
  MLP hidden channels, the same number in every layer (the config is per model), chosen per layer by
  weight-norm importance, and rebuild a smaller `DecoderLM`: fewer parameters, faster, same code.

Head importance is ||W_v(group)|| * ||W_o(columns of the group's query heads)|| (Frobenius), the size
of what the head can add to the residual stream; channel importance is ||W_fc(rows)|| * ||W_proj(col)||
(for gated MLPs the gate and up rows together). Magnitude criteria need no data (Li et al. 2017).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models import DecoderLM


def block_linears(model: DecoderLM) -> list[tuple[str, nn.Linear]]:
    """The transformer blocks' linear layers (embeddings and the LM head are left alone)."""
    return [(n, m) for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear)]


@torch.no_grad()
def magnitude_prune(model: DecoderLM, sparsity: float, scope: str = "layer") -> DecoderLM:
    """Zero the `sparsity` fraction of smallest-magnitude weights of every block linear, in place.

    scope "layer" prunes each matrix to exactly that fraction; "global" ranks all block weights together.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' or 'global', got {scope!r}")
    linears = [m for _, m in block_linears(model)]
    if scope == "global":
        allw = torch.cat([m.weight.abs().flatten().float() for m in linears])
        k = int(sparsity * allw.numel())
        if k == 0:
            return model
        threshold = torch.kthvalue(allw, k).values
        for m in linears:
            m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
        return model
    for m in linears:
        k = int(sparsity * m.weight.numel())
        if k:
            idx = torch.topk(m.weight.abs().flatten(), k, largest=False).indices
            m.weight.view(-1)[idx] = 0.0
    return model


@torch.no_grad()
def semi_structured_prune(model: DecoderLM, n: int = 2, m: int = 4) -> DecoderLM:
    """Keep the `n` largest of every `m` consecutive input weights in each row of every block linear."""
    if not 0 < n < m:
        raise ConfigError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    for name, lin in block_linears(model):
        out_f, in_f = lin.weight.shape
        if in_f % m:
            raise ConfigError(f"{name}: {in_f} input features are not a multiple of {m}; N:M pruning needs them")
        groups = lin.weight.view(out_f, in_f // m, m)
        drop = torch.topk(groups.abs(), m - n, dim=-1, largest=False).indices
        groups.scatter_(-1, drop, 0.0)
    return model


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """{"params", "nonzero", "sparsity"} over all parameters (tied weights once)."""
    total = nz = 0
    for p in model.parameters():  # each Parameter once: tied weights are not counted twice
        total += p.numel()
        nz += int((p != 0).sum())
    return {"params": total, "nonzero": nz, "sparsity": 1.0 - nz / max(total, 1)}


def _check_blocks(model: DecoderLM, part: str) -> None:
    """Structured pruning knows attention (`attn`) and dense MLP (`mlp`) blocks; say so for anything else."""
    for i, b in enumerate(model.blocks):
        mod = getattr(b, part, None)
        ok = mod is not None and (hasattr(mod, "qkv") if part == "attn" else hasattr(mod, "fc"))
        if not ok:
            raise ConfigError(f"layer {i} has no {'attention' if part == 'attn' else 'dense MLP'} block "
                              f"({type(b.token_mixer if part == 'attn' else b.channel_mixer).__name__}); "
                              f"structured {'head' if part == 'attn' else 'channel'} pruning needs one in every "
                              "layer: use magnitude or 2:4 pruning")


def _keep_count(total: int, keep: float | int, what: str) -> int:
    k = int(round(keep * total)) if isinstance(keep, float) else int(keep)
    if not 1 <= k <= total:
        raise ConfigError(f"keep {keep} {what} of {total}: must keep between 1 and {total}")
    return k


def _rebuild(model: DecoderLM, cfg, fill) -> DecoderLM:
    """A new DecoderLM of `cfg`, its tensors copied from `model` except where `fill(name, new, old)` slices."""
    new = DecoderLM(cfg, init_weights=False).to(model.tok_emb.weight.dtype)
    old_sd = model.state_dict()
    with torch.no_grad():
        for name, t in new.state_dict().items():
            src = old_sd[name]
            t.copy_(fill(name, src) if t.shape != src.shape else src)
    return new.to(model.tok_emb.weight.device)


@torch.no_grad()
def head_importance(model: DecoderLM) -> torch.Tensor:
    """(n_layer, n_kv_head) importance of each KV group of query heads (see the module docstring)."""
    cfg = model.config
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    rep = nh // nkv
    scores = []
    for b in model.blocks:
        wv = b.attn.qkv.weight[(nh + nkv) * hs:].float().view(nkv, hs, -1)
        wo = b.attn.proj.weight.float().view(-1, nkv, rep * hs)  # columns grouped by KV group
        scores.append(wv.flatten(1).norm(dim=1) * wo.transpose(0, 1).flatten(1).norm(dim=1))
    return torch.stack(scores)


@torch.no_grad()
def prune_heads(model: DecoderLM, keep: float | int) -> DecoderLM:
    """A smaller model keeping `keep` KV groups (int) or that fraction of them (float) in every layer.

    Under MHA a group is one head; under GQA a KV head with the query heads that share it.
    """
    _check_blocks(model, "attn")
    cfg = model.config
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    rep = nh // nkv
    k = _keep_count(nkv, keep, "KV head groups")
    imp = head_importance(model)
    kept = [sorted(torch.topk(imp[i], k).indices.tolist()) for i in range(cfg.n_layer)]
    new_cfg = cfg.replace(**{"attention.n_head": k * rep, "attention.n_kv_head": k, "attention.head_dim": hs})

    def fill(name: str, src: torch.Tensor) -> torch.Tensor:
        layer = int(name.split(".")[1])
        groups = kept[layer]
        q_rows = [h * hs + j for g in groups for h in range(g * rep, (g + 1) * rep) for j in range(hs)]
        kv_rows = [g * hs + j for g in groups for j in range(hs)]
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            idx = q_rows + [nh * hs + r for r in kv_rows] + [(nh + nkv) * hs + r for r in kv_rows]
            return src[idx]
        if name.endswith("attn.proj.weight"):
            return src[:, q_rows]
        raise AssertionError(f"unexpected shape change in {name}")

    return _rebuild(model, new_cfg, fill)


@torch.no_grad()
def mlp_importance(model: DecoderLM) -> torch.Tensor:
    """(n_layer, hidden) importance of each MLP hidden channel."""
    h = model.config.mlp.hidden
    scores = []
    for b in model.blocks:
        fc = b.mlp.fc.weight.float()
        rows = fc.view(2, h, -1).transpose(0, 1).flatten(1) if b.mlp.gated else fc  # (h, ...)
        scores.append(rows.norm(dim=1) * b.mlp.proj.weight.float().norm(dim=0))
    return torch.stack(scores)


@torch.no_grad()
def prune_mlp(model: DecoderLM, keep: float | int) -> DecoderLM:
    """A smaller model keeping `keep` MLP hidden channels (int) or that fraction (float) in every layer."""
    _check_blocks(model, "mlp")
    cfg = model.config
    h = cfg.mlp.hidden
    k = _keep_count(h, keep, "MLP channels")
    imp = mlp_importance(model)
    kept = [sorted(torch.topk(imp[i], k).indices.tolist()) for i in range(cfg.n_layer)]
    new_cfg = cfg.replace(**{"mlp.hidden": k})
    gated = model.blocks[0].mlp.gated

    def fill(name: str, src: torch.Tensor) -> torch.Tensor:
        ch = kept[int(name.split(".")[1])]
        if ".mlp.fc." in name:
            return src[ch + [h + c for c in ch]] if gated else src[ch]
        if name.endswith("mlp.proj.weight"):
            return src[:, ch]
        raise AssertionError(f"unexpected shape change in {name}")

    return _rebuild(model, new_cfg, fill)
