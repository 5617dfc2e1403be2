"""`lmforge align`: DPO / IPO / SimPO / ORPO, a reward model, or PPO, from a YAML recipe through the one run builder.

    lmforge align --config recipes/smollm2/dpo.yaml
    lmforge align --config recipes/smollm2/dpo.yaml --method ipo --set align.beta=0.5 train.max_steps=20
    lmforge align --config recipes/smollm2/reward.yaml
    lmforge align --config recipes/smollm2/ppo.yaml --set align.reward_model=runs/smollm2-reward/model

The recipe is a fine-tuning recipe (`lmforge.train.recipe`) plus an `align` section (`AlignConfig`), with
data.kind `preferences` or `prompts` (`lmforge.align.recipe`). The run folder is a training run's: checkpoints,
metrics.jsonl, curves.png, model/ (with heads.safetensors for a reward model) and align_metrics.json (test-split
results).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from lmforge.align.recipe import build_objective_for, check_recipe, reward_fn
from lmforge.errors import ConfigError


def align(config: str | None = None,
          method: Literal["dpo", "ipo", "simpo", "orpo", "reward", "ppo"] | None = None, set_: list[str] | None = None,
          resume: str = "none") -> int:
    """Align a model with preferences: DPO, IPO, SimPO, ORPO, a Bradley-Terry reward model, or PPO.

    The recipe says the model (model.source or preset), the adapter (LoRA keeps the reference as the
    same weights with adapters off), the data (data.kind preferences / prompts) and the align section.

    Args:
        config: the recipe YAML, e.g. recipes/smollm2/dpo.yaml.
        method: dpo | ipo | simpo | orpo | reward | ppo (overrides align.method).
        set_: overrides as dotted key=value items, e.g. --set align.beta=0.2 train.max_steps=10
        resume: "none" (fresh run), "auto" (newest whole checkpoint) or a checkpoints/step-N folder.
    """
    from lmforge.train.recipe import load_recipe
    from lmforge.train.run import build_run
    from lmforge.train.trainer import evaluate

    if not config:
        raise ConfigError("pass --config with a recipe, e.g. --config recipes/smollm2/dpo.yaml")
    overrides = list(set_ or [])
    if method is not None:
        overrides += [f"align.method={method}", f"train.objective={method}"]
        if method == "ppo":
            overrides.append("data.kind=prompts")
    recipe = load_recipe(config, overrides)
    check_recipe(recipe)
    run = build_run(recipe, resume, objective=lambda model: build_objective_for(recipe, model))
    if recipe.align.method == "ppo":
        run.trainer.data.bind(run.model, run.trainer.objective, reward_fn(recipe, run.tokenizer))
    print(f"{run.run_dir}: align {recipe.align.method}, {run.info.get('params', 0):,} parameters"
          + (f", {run.info['trainable']:,} trainable" if "trainable" in run.info else ""), file=sys.stderr)
    before = run.trainer.evaluate() if resume in (None, "", "none") else {}
    result = run.trainer.fit(resume=resume)
    if result.exit_code or not run.dist.is_main:  # under torchrun, rank 0 alone reports
        return result.exit_code
    report: dict[str, Any] = {"method": recipe.align.method, "step": result.step, "stopped": result.stopped,
                              "val_before": before, "val": result.val}
    if run.test_batches is not None:
        report["test"] = evaluate(run.model, run.trainer.objective, run.test_batches(), recipe.train.dtype)
    (run.run_dir / "align_metrics.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0
