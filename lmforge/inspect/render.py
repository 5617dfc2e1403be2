"""Pictures of the inspection analyses a person reads: PNG heatmaps (matplotlib) and one self-contained HTML page
per analysis (`lmforge.inspect.html`).

Every `save_*` takes the analysis' result (the dataclass, or the plain dict of its fields: what `to_dict()`
gives and `POST /v1/inspect` answers), writes `<name>.png`, `<name>.json` and `<name>.html` into `out_dir`
and returns the HTML file's path. matplotlib is used through `Figure` and its Agg canvas only, never pyplot,
so that rendering neither needs a display nor changes the caller's backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import ConfigError
from lmforge.inspect.html import page


def _finite(x: Any) -> Any:
    """NaN and infinities as None (JSON has neither), through nested lists."""
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def plain(value: Any) -> Any:
    """JSON-ready data: tensors as (nested) lists, dataclasses as the dict of their fields, tuples as lists,
    NaN (e.g. the head-ablation score of a layer without attention) as None."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return t.tolist() if not t.is_floating_point() else _finite(t.float().tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # the contract's field names
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "to_dict", None)):
        return plain(value.to_dict())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _label(token: str, limit: int = 14) -> str:
    """A token as a tick label: newlines and tabs shown, `$` kept from matplotlib's mathtext, long ones cut."""
    s = token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _matrix(matrix) -> torch.Tensor:
    """A float tensor of a tensor or nested list, None (a score that does not exist) as NaN: drawn blank."""
    if not isinstance(matrix, torch.Tensor):
        matrix = [[float("nan") if v is None else v for v in row] for row in matrix]
    return torch.as_tensor(matrix, dtype=torch.float32)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(max(width, 3.0), max(height, 2.0)), dpi=100, layout="constrained")


def _draw(ax, matrix, rows, cols, title, *, cmap="viridis", center=None, ticks=True):
    m = _matrix(matrix).numpy()
    kw: dict[str, Any] = {"cmap": cmap, "aspect": "auto", "interpolation": "nearest"}
    if center is not None:  # a diverging scale symmetric about `center`, so that colour means sign
        span = float(np.nan_to_num(np.nanmax(abs(m - center)) if np.isfinite(m).any() else 0.0)) or 1.0
        kw.update(vmin=center - span, vmax=center + span)
    im = ax.imshow(m, **kw)
    ax.set_title(title, fontsize=9)
    if ticks:
        ax.set_xticks(range(len(cols)), [_label(c) for c in cols], rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return im


def heatmap_png(matrix, row_labels: list[str], col_labels: list[str], title: str, path: str | Path, *,
                cmap: str = "viridis", center: float | None = None,
                annotate: list[tuple[int, int, str]] | None = None, cell: tuple[float, float] = (0.32, 0.28),
                colorbar: str = "") -> Path:
    """Write one heatmap of `matrix` (rows x cols) with its labels and a colour bar to the PNG file `path`.

    Args:
        matrix: a 2-D tensor, array or nested list.
        row_labels: one label per row (tokens are shown with newlines escaped).
        col_labels: one label per column.
        title: the picture's title.
        path: the .png file to write.
        cmap: a matplotlib colour map name.
        center: when set, a diverging scale symmetric about this value.
        annotate: (row, col, text) cells to write text into (e.g. the top heads).
        cell: width and height of one cell in inches (wider for cells holding text).
        colorbar: the colour bar's label.
    """
    m = _matrix(matrix)
    if m.dim() != 2 or m.shape[0] != len(row_labels) or m.shape[1] != len(col_labels):
        raise ConfigError(f"heatmap of shape {tuple(m.shape)} with {len(row_labels)} row and {len(col_labels)} "
                          "column labels")
    width = max(4.5, 1.6 + cell[0] * m.shape[1])
    fig = _figure(width, 1.4 + cell[1] * m.shape[0])
    ax = fig.add_subplot()
    im = _draw(ax, m, row_labels, col_labels, textwrap.fill(title, int(width * 9)), cmap=cmap, center=center)
    for r, c, text in annotate or ():
        ax.text(c, r, text, ha="center", va="center", fontsize=7, color="black",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.7, "lw": 0})
    fig.colorbar(im, ax=ax, shrink=0.8, label=colorbar)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _write(out_dir: str | Path, name: str, kind: str, data: dict, title: str, subtitle: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
    target = out / f"{name}.html"
    target.write_text(page(kind, data, title, subtitle), encoding="utf-8")
    return target


# ---- attention and rollout ------------------------------------------------------------------------
def attention_data(trace, *, layer: int | None = None, head: int | None = None, row: int = 0) -> dict:
    """The attention of one row of a `Trace` as a plain dict: {tokens, layer_labels, head_labels, attention}.

    `attention[i]` is a list of head matrices (T x L) of layer `layer_labels[i]`, or None where that layer
    has no attention (a Mamba or RWKV layer). `layer`/`head` keep one layer or one head. A dict already in this
    shape, or one with `tokens` and per-layer `attention` (B, n_head, T, L) lists, is accepted too.
    """
    tokens, maps = (trace["tokens"], trace["attention"]) if isinstance(trace, dict) else (trace.tokens, trace.attention)
    if tokens and isinstance(tokens[0], list):
        tokens = tokens[row]
    if not maps:
        raise ConfigError("the trace holds no attention: capture it with capture=('attention',)")
    n = len(maps)
    if layer is not None and not -n <= layer < n:
        raise ConfigError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    layers = range(n) if layer is None else [layer % n]
    out, labels = [], []
    for i in layers:
        a = maps[i]
        if a is not None:
            a = torch.as_tensor(a, dtype=torch.float32)
            a = a[row] if a.dim() == 4 else a  # (n_head, T, L)
            if head is not None:
                if not -a.shape[0] <= head < a.shape[0]:
                    raise ConfigError(f"head {head} is out of range: layer {i} has {a.shape[0]} heads")
                head_index = head % a.shape[0]
                a = a[head_index].unsqueeze(0)
            a = plain(a)
        elif layer is not None:
            raise ConfigError(f"layer {i} has no attention (its token mixer is not attention)")
        out.append(a)
        labels.append(f"layer {i}")
    if all(a is None for a in out):
        raise ConfigError("no layer of this model has attention maps (its token mixers are not attention)")
    head_labels = None if head is None else [f"head {head_index}"]
    return {"tokens": list(tokens), "layer_labels": labels, "head_labels": head_labels, "attention": out}


def _attention_png(data: dict, path: Path) -> None:
    layers = [(lab, a) for lab, a in zip(data["layer_labels"], data["attention"]) if a is not None]
    n_head = max(len(a) for _, a in layers)
    per_head = len(layers) * n_head <= 96  # beyond that a grid of single heads is unreadable: average them
    cols = n_head if per_head else min(len(layers), 6)
    rows = len(layers) if per_head else math.ceil(len(layers) / cols)
    T = len(data["tokens"])
    side = 1.6 + 0.05 * T
    fig = _figure(side * cols, side * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    ticks = rows * cols == 1
    for i, (lab, a) in enumerate(layers):
        mats = a if per_head else [torch.tensor(a).mean(0)]
        for h, m in enumerate(mats):
            ax = axes[i, h] if per_head else axes.flat[i]
            ax.set_axis_on()
            labels = data["head_labels"] or [f"head {j}" for j in range(len(mats))]
            name = labels[h] if per_head else "mean of heads"
            _draw(ax, m, data["tokens"], data["tokens"][: len(m[0])] if ticks else [], f"{lab}, {name}",
                  ticks=ticks)
    fig.suptitle("attention: rows attend to columns", fontsize=10)
    fig.savefig(path)


def save_attention(trace, out_dir: str | Path, *, layer: int | None = None, head: int | None = None,
                   row: int = 0, name: str = "attention") -> Path:
    """Attention maps of a `Trace` (captured with "attention"): a layer x head grid PNG, JSON and an HTML page
    where hovering a token shows where it attends, with layer and head pickers. Returns the HTML path."""
    data = attention_data(trace, layer=layer, head=head, row=row)
    data["flow"] = None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _attention_png(data, Path(out_dir) / f"{name}.png")
    return _write(out_dir, name, "attention", data, "Attention", f"{len(data['tokens'])} tokens")


def save_rollout(matrix, tokens: list[str], out_dir: str | Path, *, flow=None, note: str | None = None,
                 name: str = "rollout") -> Path:
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020): the (T, T)
    matrix of how much each token's representation draws on each input token through all layers, with the
    attention flow values (T,) when given (else `note` says why not). Writes PNG, JSON and HTML; returns the
    HTML path."""
    m = plain(torch.as_tensor(matrix, dtype=torch.float32))
    if len(m) != len(tokens):
        raise ConfigError(f"rollout matrix has {len(m)} rows for {len(tokens)} tokens")
    data = {"tokens": list(tokens), "layer_labels": ["rollout"], "head_labels": ["all layers"], "attention": [[m]],
            "flow": None if flow is None else plain(torch.as_tensor(flow, dtype=torch.float32))}
    heatmap_png(m, tokens, tokens[: len(m[0])], "attention rollout: rows draw on columns",
                Path(out_dir) / f"{name}.png")
    return _write(out_dir, name, "attention", data, "Attention rollout", note or "Abnar & Zuidema 2020")


# ---- head ablation, logit lens, attribution, probes ------------------------------------------------
def _fields(result, *names: str) -> dict:
    data = plain(result)
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"{type(result).__name__} lacks {', '.join(missing)} (expected the fields of the analysis)")
    return data


def save_head_ablation(result, out_dir: str | Path, *, name: str = "heads") -> Path:
    """A `HeadAblation`: the layer x head heatmap of the metric's change with the top heads annotated, JSON and
    an HTML page with the same grid and the top heads listed. Returns the HTML path."""
    data = _fields(result, "scores", "baseline", "metric", "top")
    scores = data["scores"]
    marks = [(int(layer), int(head), f"#{i + 1}") for i, (layer, head, _) in enumerate(data["top"][:5])]
    heatmap_png(scores, [str(i) for i in range(len(scores))], [str(h) for h in range(len(scores[0]))],
                f"head ablation: {data['metric']} change (baseline {data['baseline']:.4g}); rows layers, columns heads",
                Path(out_dir) / f"{name}.png", cmap="RdBu_r", center=0.0, annotate=marks,
                colorbar=f"{data['metric']} change")
    return _write(out_dir, name, "heads", data, "Head ablation", f"metric: {data['metric']}")


def save_lens(result, out_dir: str | Path, *, name: str = "lens") -> Path:
    """A `LogitLens`: a table image (layer x position, each cell the top token over its probability, or the
    target's rank), JSON and an HTML page with the table and its top-k on hover. Returns the HTML path."""
    data = _fields(result, "tokens", "top_tokens", "top_probs", "target_id", "target_rank")
    data.setdefault("target", None)
    tokens, L = data["tokens"], len(data["top_tokens"])
    rows = [("embeddings" if i == 0 else f"layer {i}") for i in range(L)][::-1]
    rank = data["target_rank"]
    if rank is not None:  # the rank on a log scale: 0 (top) is bright
        values = [[-math.log1p(r) for r in rank[i]] for i in range(L)][::-1]
        text = [[str(r) for r in rank[i]] for i in range(L)][::-1]
        title = f"logit lens: rank of the target (id {data['target_id']}), 0 = top"
    else:
        values = [[p[0] for p in data["top_probs"][i]] for i in range(L)][::-1]
        text = [[_label(t[0], 8) for t in data["top_tokens"][i]] for i in range(L)][::-1]
        title = "logit lens: top next token after each layer (shade: its probability)"
    notes = [(r, c, text[r][c]) for r in range(L) for c in range(len(tokens))]
    heatmap_png(values, rows, tokens, title, Path(out_dir) / f"{name}.png", cmap="Blues", annotate=notes,
                cell=(0.75, 0.3), colorbar="-log(1 + rank)" if rank is not None else "probability")
    return _write(out_dir, name, "lens", data, "Logit lens", "through the model's own final norm and head")


def save_attribution(result, out_dir: str | Path, *, name: str = "attribution") -> Path:
    """An `Attribution`: a bar chart of the per-token scores (PNG), JSON and an HTML page with the tokens
    coloured by attribution (diverging scale, legend) and the largest ones listed. Returns the HTML path."""
    data = _fields(result, "tokens", "scores", "target_id", "method")
    data.pop("per_dim", None)  # (T, C): large, and no picture shows it
    data.pop("input_ids", None)
    for key in ("target", "delta", "steps", "baseline"):
        data.setdefault(key, None)
    scores, tokens = data["scores"], data["tokens"]
    fig = _figure(1.5 + 0.35 * len(tokens), 3.2)
    ax = fig.add_subplot()
    ax.bar(range(len(scores)), scores, color=["#d62728" if s >= 0 else "#1f77b4" for s in scores])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(tokens)), [_label(t) for t in tokens], rotation=90, fontsize=8)
    delta = "" if data["delta"] is None else f", delta {data['delta']:.2e}"
    title = f"{data['method']} for target {_label(str(data['target']))!r}{delta}"
    ax.set_title(textwrap.fill(title, 40), fontsize=9)  # a narrow figure (few tokens) must not cut the delta off
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / f"{name}.png")
    return _write(out_dir, name, "attribution", data, "Attribution",
                  f"{data['method']}: which input tokens drove the next token")


def save_probes(result, out_dir: str | Path, *, name: str = "probe") -> Path:
    """A `ProbeResult`: accuracy per layer with the control task and the majority line (PNG), JSON and an HTML
    page with the same chart (inline SVG) and a table. Returns the HTML path."""
    data = _fields(result, "task", "layers", "accuracy", "control_accuracy", "selectivity", "majority",
                   "n_train", "n_test")
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    ax.plot(data["layers"], data["accuracy"], "o-", color="#d62728", label="probe accuracy (held out)")
    ax.plot(data["layers"], data["control_accuracy"], "s--", color="#1f77b4", label="control task (random labels)")
    ax.axhline(data["majority"], color="grey", ls=":", label="majority class")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"linear probe: {data['task']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / f"{name}.png")
    return _write(out_dir, name, "probe", data, "Linear probes", f"task: {data['task']}")
