"""Instruction fine-tuning of a pretrained model, in full or through an adapter: the recipe `lmforge finetune` runs
(`finetune_recipe`) and its multiple-choice score (`choice_accuracy`).

    lmforge finetune --method lora --model smollm2 --data shakespeare-instruct --set train.max_steps=200
    lmforge finetune --config recipes/smollm2-135m/lora.yaml --resume auto

A recipe (recipes/<model>/<method>.yaml) or the defaults below, then --method / --model / --data /
--out / --set on top, go through the one run builder (`lmforge.train.run.build_run`) and the one
`Trainer`: checkpoints, exact resume, metrics.jsonl and curves.png as in pre-training. At the end the
run's model is scored on the test split: loss on the answers, and for multiple-choice rows (the built-in
set's speaker and work questions) the accuracy of picking the most likely option (`choice_accuracy`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from lmforge.errors import ConfigError, FormatError
from lmforge.train.objectives import IGNORE_INDEX, accepts_targets
from lmforge.train.recipe import apply_overrides, from_dict

Method = Literal["full", "lora", "dora", "qlora", "adalora", "adapter", "prefix", "prompt"]

DEFAULTS: dict[str, Any] = {
    "model": {"source": "smollm2"},
    "data": {"kind": "instructions", "source": "shakespeare-instruct"},
    "train": {"max_steps": 100, "batch_size": 8, "seq_len": 256, "eval_every": 50, "eval_batches": 8,
              "checkpoint_every": 50, "keep_last": 1, "log_every": 1, "seed": 1337},
    "optim": {"lr": 2.0e-4, "min_lr": 2.0e-5, "warmup_steps": 10, "weight_decay": 0.0, "grad_clip": 1.0},
    "adapter": {"method": "lora"},
    "run": {"dir": "runs/finetune", "samples": 0},
}
# full fine-tuning moves every weight: a smaller step than an adapter's
FULL_LR = {"lr": 2.0e-5, "min_lr": 2.0e-6}


@torch.no_grad()
def choice_accuracy(model, tok, rows: list[dict], batch_size: int = 8) -> dict[str, float]:
    """Multiple-choice accuracy: for each row with `options` and `answer`, the option whose tokens (as the
    assistant's reply, end-of-turn included) the model finds most likely, summed log-probability.

    Returns {"choice_acc", "choice_n"} ({} when no row has options).
    """
    from lmforge.data.instruct import Example, collate, render, to_messages

    rows = [r for r in rows if r.get("options") and r.get("answer") in r["options"]]
    if not rows:
        return {}
    was = model.training
    model.eval()
    seqs, owner = [], []
    for i, r in enumerate(rows):
        msgs = to_messages(r)
        for opt in r["options"]:
            ids, mask = render(tok, [*msgs[:-1], {"role": "assistant", "content": opt}])
            seqs.append(Example(ids, mask, r))
            owner.append((i, opt))
    scores: list[float] = []
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    for k in range(0, len(seqs), batch_size):
        b = collate(seqs[k:k + batch_size], pad)
        if accepts_targets(model):  # through the LM head in row chunks: no (B, T, vocab) logits
            nll, _ = model(b["input_ids"], targets=b["labels"].masked_fill(~b["loss_mask"].bool(), IGNORE_INDEX))
            scores += (-nll).sum(1).tolist()
            continue
        logp = torch.log_softmax(model(b["input_ids"]).float(), -1)
        tgt = logp.gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1)  # (B, T)
        scores += (tgt * b["loss_mask"]).sum(1).tolist()
    model.train(was)
    best: dict[int, tuple[float, str]] = {}
    for (i, opt), s in zip(owner, scores, strict=True):
        if i not in best or s > best[i][0]:
            best[i] = (s, opt)
    hits = sum(best[i][1] == r["answer"] for i, r in enumerate(rows))
    return {"choice_acc": hits / len(rows), "choice_n": float(len(rows))}


def finetune_recipe(config: str | None = None, method: str | None = None, model: str | None = None,
                    data: str | None = None, out: str | None = None, set_: list[str] | None = None):
    """The validated recipe `finetune` runs: the YAML (or `DEFAULTS`), the options, then the overrides."""
    if config:
        path = Path(config)
        if not path.is_file():
            raise FormatError(f"recipe {config} not found; pass --config with a file such as "
                              "recipes/smollm2-135m/lora.yaml, or leave it out for the defaults")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FormatError(f"recipe {config} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"recipe {config} must be a YAML mapping")
    else:
        d = copy.deepcopy(DEFAULTS)
        if method == "full":
            d["optim"].update(FULL_LR)
    d.setdefault("adapter", {})
    d.setdefault("data", {}).setdefault("kind", "instructions")
    if method:
        d["adapter"]["method"] = method
    if model:
        d["model"] = {"source": model}
    if data:
        d["data"]["source"] = data
    if out:
        d.setdefault("run", {})["dir"] = out
    elif not config:
        d["run"]["dir"] = f"runs/finetune-{d['adapter']['method']}"
    return from_dict(apply_overrides(d, set_ or []), config or "finetune defaults")
