"""`lmforge merge`: fine-tunes of one base into one model, no training (`lmforge.compress.merging`)."""

from __future__ import annotations

from pathlib import Path

from lmforge.compress.merging import Method, merge_models


def merge(models: list[str], out: str = "runs/merged", base: str | None = None, method: Method = "ties",
          weights: list[float] | None = None, density: float = 0.5, scale: float = 1.0, seed: int = 0,
          eval_text: str | None = None) -> int:
    """Merge two or more fine-tunes of one base model into one model folder (no training).

    Example: lmforge merge runs/a/model runs/b/model --base runs/base/model --method ties --density 0.5 --out merged

    Args:
        models: the fine-tuned model folders (same architecture and base).
        out: folder to write the merged model to.
        base: the base model the fine-tunes started from (needed by every method but average).
        method: average | task_arithmetic | ties | dare | dare_ties.
        weights: one weight per model (average: mixing weights, default uniform; others: task-vector weights,
            default 1).
        density: fraction of each task vector kept (ties: largest magnitudes; dare: random, rescaled).
        scale: multiplies the merged task vector (lambda).
        seed: DARE's random drops.
        eval_text: a text file; prints every model's perplexity on it and the merged model's.
    """
    merged = merge_models(models, base, method, weights, density, scale, seed)
    merged.save(out)
    print(f"merged {len(models)} models with {method} (density {density}, scale {scale}) -> {out}")
    if eval_text:
        from lmforge.evaluate.perplexity import perplexity
        from lmforge.llm import load

        text = Path(eval_text).read_text(encoding="utf-8")
        for name in [*models, *([base] if base else []), out]:
            llm = load(name)
            print(f"{name}: perplexity {perplexity(llm, [text]).perplexity:.3f}")
    return 0
