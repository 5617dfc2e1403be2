"""The quickstart run (`lmforge quickstart`, what `make demo` runs): tokenizer + small model on Shakespeare in a
few CPU minutes, sized to a time budget.

It is the pretrain pipeline with a built-in recipe (`recipes/quickstart.yaml` spells out the same one):
train a byte-level BPE tokenizer on the embedded corpus, tokenize it into shards, train a small
Llama-style decoder with the one `Trainer`, and print validation loss/perplexity before and after and
samples at temperature 0.1 and 1.0. The model folder it leaves (`<out>/model`) is what
`lmforge generate --model <folder>` and `lmforge.load(folder)` read.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.train.recipe import Recipe, apply_overrides, dump_yaml, from_dict
from lmforge.train.run import Run, resolved_dict

# Sized for ~3-4 minutes on 2 CPU cores (AVX-512 BF16) including tokenizer training and tokenization;
# see recipes/quickstart.yaml for the measurements behind the numbers.
QUICKSTART: dict[str, Any] = {
    "model": {"preset": "tiny-llama", "name": "quickstart", "block_size": 256, "d_model": 256, "n_layer": 4,
              "tie_embeddings": True, "attention": {"n_head": 8, "n_kv_head": 8}, "mlp": {"hidden": 640}},
    "tokenizer": {"kind": "bpe", "vocab_size": 4096},
    "data": {"kind": "tokens", "source": "shakespeare"},
    "train": {"max_steps": 300, "batch_size": 16, "grad_accum": 1, "eval_every": 100, "eval_batches": 8,
              "checkpoint_every": 100, "keep_last": 1, "dtype": "auto", "log_every": 1, "seed": 1337},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30, "weight_decay": 0.1, "beta2": 0.95, "grad_clip": 1.0},
    "run": {"dir": "runs/quickstart", "samples": 2, "sample_tokens": 80, "sample_prompt": "Romeo.\n"},
}


# Where the CPU has no native bf16 (lmforge.precision), quickstart trains in fp32, where a batch-16 step costs
# ~1.4x (AVX-512) to ~2x (AVX2) a bf16 one: fewer than 300 steps would fit in 180 s. Batch 8 fits ~2x the steps.
FP32_TRAIN: dict[str, Any] = {"batch_size": 8}


def seconds_per_step(tr, n: int = 3) -> float:
    """Time `n` training steps on a throwaway copy of the model (the run's own data stream is untouched)."""
    from lmforge.train.batches import TokenWindows
    from lmforge.train.trainer import Trainer

    probe_data = TokenWindows(tr.data.tokens, tr.cfg.batch_size, tr.data.block_size, seed=12345)
    cfg = dataclasses.replace(tr.cfg, max_steps=n + 1, eval_every=0, progress=False, compile=False)
    probe = Trainer(copy.deepcopy(tr.model), tr.objective, probe_data, cfg, tr.optim_cfg)
    probe.cfg.max_steps = 1
    probe.fit()  # first step: one-off kernel selection and allocation
    t0 = time.perf_counter()
    probe.cfg.max_steps = n + 1
    probe.fit(resume=None)
    return (time.perf_counter() - t0) / n


def quickstart_recipe(steps: int, out: str, vocab_size: int, dtype: str, threads: int, progress: bool,
                      overrides: list[str]) -> Recipe:
    """`QUICKSTART` with the command's options and `overrides` on top; `dtype` is already resolved
    (`lmforge.precision.train_dtype`): float32 takes `FP32_TRAIN`'s smaller batch."""
    d = {k: dict(v) for k, v in QUICKSTART.items()}
    d["train"].update(max_steps=steps, dtype=dtype, threads=threads, progress=progress)
    if dtype == "float32":  # no native bf16: steps cost ~1.4-2x more, so half the batch keeps >= 300 of them
        d["train"].update(FP32_TRAIN)
    d["tokenizer"]["vocab_size"] = vocab_size
    d["run"]["dir"] = out
    return from_dict(apply_overrides(d, overrides), "quickstart")


def clear_run(run_dir: Path, recipe: Recipe) -> None:
    """Remove an earlier run's model, checkpoints and curves from `run_dir`; its tokenizer and tokenized data
    stay when the tokenizer has the recipe's vocabulary size."""
    for name in ("checkpoints", "model", "best", "metrics.jsonl", "curves.png"):
        p = run_dir / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    tok_cfg = run_dir / "tokenizer" / "tokenizer.json"
    if tok_cfg.is_file():
        from lmforge.tokenizers import load_tokenizer

        if load_tokenizer(tok_cfg.parent).vocab_size != recipe.tokenizer.vocab_size:
            shutil.rmtree(run_dir / "tokenizer")
            shutil.rmtree(run_dir / "data", ignore_errors=True)


def fit_to_budget(run: Run, steps: int, time_budget: float, threads: int) -> None:
    """Size `run` to `time_budget` seconds from a few timed steps: train.max_steps (at most `steps`), the
    evaluation and checkpoint interval, the warmup and the time clock; rewrites the run's config.yaml.

    With `threads` 0 and several threads available, one thread is timed too and kept when faster."""
    recipe, tr = run.recipe, run.trainer
    # Eval passes cost ~1/3 step per batch. The schedule runs on the time clock, so if the machine slows
    # down mid-run (other jobs), the budget still ends the run with the learning rate annealed.
    per_step = seconds_per_step(tr)
    if threads == 0 and torch.get_num_threads() > 1:
        # Measured: with another busy process on a 2-core machine, 2 threads train ~4x slower than 1
        # (every OpenMP barrier waits for the descheduled thread); quiet, 2 threads are ~2x faster.
        n_all = torch.get_num_threads()
        torch.set_num_threads(1)
        one = seconds_per_step(tr)
        if one < per_step:
            print(f"the CPU is busy: training with 1 thread ({one:.2f}s per step against "
                  f"{per_step:.2f}s with {n_all})", flush=True)
            per_step, recipe.train.threads = one, 1
        else:
            torch.set_num_threads(n_all)
    n_evals = 3
    eval_cost = n_evals * tr.cfg.eval_batches * per_step / 3
    fit = max(1, int((time_budget - eval_cost) / per_step))
    t, o = recipe.train, recipe.optim
    t.max_steps = min(steps, fit)
    t.eval_every = t.checkpoint_every = max(1, t.max_steps // n_evals)
    t.time_budget, t.schedule_clock = time_budget, "time"
    o.warmup_steps = min(o.warmup_steps, max(t.max_steps // 10, 1))
    (run.run_dir / "config.yaml").write_text(dump_yaml(resolved_dict(recipe, tr.model.config)))
    print(f"{per_step:.2f}s per step on this machine: training {t.max_steps} steps "
          f"({t.max_steps * t.batch_size * run.info['seq_len']:,} tokens)", flush=True)
