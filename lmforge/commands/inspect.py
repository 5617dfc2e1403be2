"""The inspection command: `lmforge inspect ANALYSIS --model M --text T --out DIR`, writing PNG, JSON and HTML."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError

ANALYSES = ("attention", "rollout", "heads", "lens", "attribute", "probe")  # as lmforge.inspect.run.ANALYSES
ATTRIBUTIONS = ("integrated_gradients", "gradient_x_input", "saliency")  # checked here before loading a model


def _target(target: str | None) -> str | int | None:
    """`--target 123` names a token id, anything else a token's text."""
    return int(target) if target is not None and target.lstrip("-").isdigit() else target


def _texts(text: str | None, data: str | None, analysis: str) -> list[str]:
    texts = [text] if text is not None else []
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise ConfigError(f"--data {data}: no such file")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts or not all(t.strip() for t in texts):
        raise ConfigError(f"lmforge inspect {analysis} needs a non-empty --text (or --data for heads)")
    return texts


def inspect(analysis: str, model: str = "smollm2", text: str | None = None, out: str = "runs/inspect",
            layer: int | None = None, head: int | None = None, target: str | None = None, k: int = 5,
            attribution: str = "integrated_gradients", steps: int = 50, method: str = "gausslegendre",
            baseline: str = "pad", metric: str = "loss", distractor: str | None = None, data: str | None = None,
            task: str = "comedy_vs_tragedy", pooling: str = "mean", limit: int | None = None, seed: int = 0,
            dtype: str = "float32") -> int:
    """Look inside a model: attention maps, rollout, head ablation, logit lens, attribution or linear probes.

    Writes <analysis>.png, <analysis>.json and a self-contained <analysis>.html (opens offline) into --out and
    prints their paths. Examples:
    lmforge inspect lens --model smollm2 --text "The capital of France is" --target " Paris"
    lmforge inspect attribute --model smollm2 --text "The capital of France is" --steps 50
    lmforge inspect heads --model smollm2 --data sentences.txt --metric loss
    lmforge inspect probe --model smollm2 --task verse_vs_prose

    Args:
        analysis: attention (maps per layer and head), rollout (attention rollout and flow), heads (head
            ablation), lens (logit lens), attribute (integrated gradients, gradient x input or saliency) or probe
            (linear probes per layer).
        model: a model folder, a .gguf file, a short name (smollm2) or preset:<name>.
        text: the input text (every analysis but probe).
        out: folder to write the files to (created if needed).
        layer: attention: show only this layer.
        head: attention: show only this head (of every layer shown).
        target: the token to explain (lens: its rank at every layer; attribute, heads with logit_diff): a
            token's text such as " Paris", or a token id; default the model's own next token.
        k: lens: top tokens kept per layer and position.
        attribution: attribute: integrated_gradients, gradient_x_input or saliency.
        steps: attribute: integrated-gradients steps.
        method: attribute: the integration rule: gausslegendre, riemann_trapezoid, riemann_left,
            riemann_right or riemann_middle.
        baseline: attribute: the integrated-gradients baseline: pad (that token everywhere), zeros, mask or unk.
        metric: heads: loss or logit_diff (then --target and --distractor name the two tokens).
        distractor: heads: the competing token of logit_diff.
        data: heads: a text file of sentences, one per line, ablated together (with --text if given).
        task: probe: the labelled probing task (comedy_vs_tragedy, verse_vs_prose, ...).
        pooling: probe: mean or last (how a text's token representations become one vector).
        limit: probe: use at most this many examples.
        seed: probe: the seed of the split and the control labels.
        dtype: float32 or bfloat16.
    """
    if analysis not in ANALYSES:
        raise ConfigError(f"unknown analysis {analysis!r}; one of {', '.join(ANALYSES)}")
    if attribution not in ATTRIBUTIONS:
        raise ConfigError(f"unknown --attribution {attribution!r}; one of {', '.join(ATTRIBUTIONS)}")
    if k < 1 or steps < 1:
        raise ConfigError("--k and --steps must be at least 1")
    texts = _texts(text, data, analysis) if analysis != "probe" else []
    import lmforge
    from lmforge.inspect.run import analyze, save

    llm = lmforge.load(model, dtype=dtype)
    result = analyze(llm, analysis, texts, layer=layer, head=head, target=_target(target), k=k,
                     attribution=attribution, steps=steps, method=method, baseline=baseline, metric=metric,
                     distractor=_target(distractor), task=task, pooling=pooling, limit=limit, seed=seed)
    html = save(analysis, result, out, layer=layer, head=head)
    for suffix in (".png", ".json", ".html"):
        print(html.with_suffix(suffix))
    return 0
