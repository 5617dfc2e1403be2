"""One entry point for every analysis by name, shared by `lmforge inspect` and `POST /v1/inspect`.

`analyze(llm, "lens", ["The capital of France is"], target=" Paris")` runs the analysis, `as_json` gives what
the server answers (the analysis' `to_dict()`), `save` writes its PNG, JSON and HTML (`lmforge.inspect.render`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError

ANALYSES = ("attention", "rollout", "heads", "lens", "attribute", "probe")
ATTRIBUTIONS = ("integrated_gradients", "gradient_x_input", "saliency")


def _index(value: int | None, n: int, what: str, where: str) -> None:
    if value is not None and not -n <= value < n:
        raise ConfigError(f"{what} {value} is out of range: {where} has {n} {what}s (0..{n - 1})")


def check(llm, analysis: str, texts: list, *, layer: int | None = None, head: int | None = None,
          attribution: str = "integrated_gradients") -> None:
    """Refuse bad input with one line before any model work: the analysis' name, indices, an empty text."""
    if analysis not in ANALYSES:
        raise ConfigError(f"unknown analysis {analysis!r}; one of {', '.join(ANALYSES)}")
    if attribution not in ATTRIBUTIONS:
        raise ConfigError(f"unknown attribution {attribution!r}; one of {', '.join(ATTRIBUTIONS)}")
    if analysis != "probe" and (not texts or any(isinstance(t, str) and not t.strip() for t in texts)):
        raise ConfigError(f"the {analysis} analysis needs a non-empty text")
    _index(layer, llm.config.n_layer, "layer", "the model")
    _index(head, llm.config.n_head, "head", "each layer")


def analyze(llm, analysis: str, texts: list, *, layer: int | None = None, head: int | None = None,
            target: str | int | None = None, k: int = 5, attribution: str = "integrated_gradients",
            steps: int = 50, method: str = "gausslegendre", baseline: str = "pad", metric: str = "loss",
            distractor: str | int | None = None, task: str = "comedy_vs_tragedy", pooling: str = "mean",
            limit: int | None = None, seed: int = 0) -> Any:
    """Run the analysis named `analysis` on `llm`; returns its result.

    Args:
        llm: an `lmforge.LLM`.
        analysis: attention (a `Trace` with attention), rollout (a dict: tokens, rollout (T, T), flow (T,)),
            heads (`HeadAblation`), lens (`LogitLens`), attribute (`Attribution`) or probe (`ProbeResult`).
        texts: the input: one text (or a (1, T) id tensor); heads takes several texts.
        layer: attention: the layer shown (checked against the model).
        head: attention: the head shown.
        target: lens, attribute, heads (logit_diff): the token's text or id.
        k: lens: top tokens per layer and position.
        attribution: integrated_gradients, gradient_x_input or saliency.
        steps: integrated-gradients steps.
        method: integrated gradients' integration rule (Captum's names).
        baseline: integrated gradients' baseline.
        metric: heads: loss or logit_diff.
        distractor: heads: logit_diff's competing token.
        task: probe: the probing task.
        pooling: probe: mean or last.
        limit: probe: at most this many examples.
        seed: probe: the split's and control labels' seed.
    """
    check(llm, analysis, texts, layer=layer, head=head, attribution=attribution)
    if analysis in ("attention", "rollout"):
        trace = llm.inspect(texts[0], capture=("attention",))
        if analysis == "attention":
            return trace
        from lmforge.inspect.attention import attention_flow, rollout

        try:  # an exact max-flow: refused past a size (a long text); the rollout is shown without it then
            flow, note = attention_flow(trace), None
        except ConfigError as e:
            flow, note = None, str(e)
        return {"tokens": list(trace.tokens[0]), "rollout": rollout(trace), "flow": flow, "flow_note": note}
    if analysis == "heads":
        from lmforge.inspect.ablation import head_ablation

        return head_ablation(llm, texts, metric=metric, target=target, distractor=distractor)
    if analysis == "lens":
        from lmforge.inspect.lens import logit_lens

        return logit_lens(llm, texts[0], k=k, target=target)
    if analysis == "attribute":
        from lmforge.inspect import attribution as attr

        if attribution == "integrated_gradients":
            return attr.integrated_gradients(llm, texts[0], target=target, steps=steps, method=method,
                                             baseline=baseline)
        return getattr(attr, attribution)(llm, texts[0], target=target)
    from lmforge.inspect.probes import probe_layers

    return probe_layers(llm, task, pooling=pooling, seed=seed, limit=limit)


def as_json(analysis: str, result: Any, *, layer: int | None = None, head: int | None = None) -> dict:
    """What `POST /v1/inspect` answers: the result's `to_dict()` (attention: the maps shown; rollout: its dict)."""
    from lmforge.inspect.render import attention_data, plain

    if analysis == "attention":
        return attention_data(result, layer=layer, head=head)
    to_dict = getattr(result, "to_dict", None)
    return plain(to_dict() if callable(to_dict) else result)


def save(analysis: str, result: Any, out: str | Path, *, layer: int | None = None, head: int | None = None) -> Path:
    """Write the result's `<name>.png`, `.json` and `.html` into `out`; returns the HTML path."""
    from lmforge.inspect import render

    if analysis == "attention":
        return render.save_attention(result, out, layer=layer, head=head)
    if analysis == "rollout":
        return render.save_rollout(result["rollout"], result["tokens"], out, flow=result["flow"],
                                   note=result.get("flow_note"))
    saver = {"heads": render.save_head_ablation, "lens": render.save_lens, "attribute": render.save_attribution,
             "probe": render.save_probes}[analysis]
    return saver(result, out)
