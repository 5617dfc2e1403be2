"""`lmforge quickstart` (what `make demo` runs): tokenizer + small model on Shakespeare in a few CPU minutes.

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
from typing import Any, Literal

import torch

from lmforge.errors import ConfigError

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


def _seconds_per_step(tr, n: int = 3) -> float:
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


def quickstart(steps: int = 600, out: str = "runs/quickstart", time_budget: float = 180.0,
               vocab_size: int = 4096, dtype: Literal["auto", "bfloat16", "float32"] = "auto", threads: int = 0,
               overwrite: bool = True, progress: bool = True, set_: list[str] | None = None) -> int:
    """Train a BPE tokenizer and a small decoder on the embedded Shakespeare corpus in a few minutes.

    Prints validation loss and perplexity before and after training and samples at temperature 0.1 and
    1.0, and leaves a model folder in <out>/model for `lmforge generate "Romeo." --model <out>/model`.
    The number of steps is the smaller of --steps and what fits in --time-budget on this machine (timed
    on a few probe steps first), so that the learning-rate schedule runs its whole course.

    Args:
        steps: optimizer steps at most (batch 16 x 256 tokens each).
        out: the run folder (tokenizer/, data/, checkpoints/, metrics.jsonl, curves.png, model/).
        time_budget: seconds of training (after tokenizer training and tokenization, ~10 s).
        vocab_size: BPE vocabulary size.
        dtype: auto (bfloat16 where the CPU computes it natively, as measured: lmforge.precision; else
            float32, with a note), bfloat16 (autocast; about 2x faster with AVX-512 BF16, many times slower
            where the CPU only emulates it: kept, with a warning) or float32.
        threads: torch threads; 0 keeps torch's default (all cores).
        overwrite: start afresh when <out> already holds a run (its tokenizer and data are reused when they
            match); --no-overwrite resumes it instead.
        progress: show the progress bar.
        set_: further recipe overrides as dotted key=value items (e.g. model.n_layer=4).
    """
    from lmforge.llm import load
    from lmforge.precision import train_dtype
    from lmforge.train.commands import resolved_dict, samples, setup_run
    from lmforge.train.recipe import apply_overrides, dump_yaml, from_dict

    if time_budget <= 0 or steps < 1:
        raise ConfigError(f"--steps must be >= 1 and --time-budget > 0, got {steps} and {time_budget}")
    t_all = time.perf_counter()
    dtype = train_dtype(dtype, what="quickstart --dtype")
    d = {k: dict(v) for k, v in QUICKSTART.items()}
    d["train"].update(max_steps=steps, dtype=dtype, threads=threads, progress=progress)
    if dtype == "float32":  # no native bf16: steps cost ~1.4-2x more, so half the batch keeps >= 300 of them
        d["train"].update(FP32_TRAIN)
    d["tokenizer"]["vocab_size"] = vocab_size
    d["run"]["dir"] = out
    recipe = from_dict(apply_overrides(d, set_ or []), "quickstart")
    run_dir = Path(out)
    if overwrite:  # a fresh model each time; the tokenizer and tokenized data are kept when they match
        for name in ("checkpoints", "model", "best", "metrics.jsonl", "curves.png"):
            p = run_dir / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        tok_cfg = run_dir / "tokenizer" / "tokenizer.json"
        if tok_cfg.is_file():
            from lmforge.tokenizers import load_tokenizer

            if load_tokenizer(tok_cfg.parent).vocab_size != recipe.tokenizer.vocab_size:
                shutil.rmtree(run_dir / "tokenizer")
                shutil.rmtree(run_dir / "data", ignore_errors=True)
    resume = None if overwrite else "auto"
    run = setup_run(recipe, resume=resume)
    tr = run.trainer
    print(f"quickstart: {run.info['params'] / 1e6:.2f}M-parameter decoder, vocab {run.tokenizer.vocab_size}, "
          f"{run.info['train_tokens']:,} training tokens; tokenizer + data ready in "
          f"{time.perf_counter() - t_all:.1f}s", flush=True)
    if overwrite:
        # Size the run to the budget from a few timed steps (eval passes cost ~1/3 step per batch). The
        # schedule runs on the time clock, so if the machine slows down mid-run (other jobs), the budget
        # still ends the run with the learning rate annealed.
        per_step = _seconds_per_step(tr)
        if threads == 0 and torch.get_num_threads() > 1:
            # Measured: with another busy process on a 2-core machine, 2 threads train ~4x slower than 1
            # (every OpenMP barrier waits for the descheduled thread); quiet, 2 threads are ~2x faster.
            n_all = torch.get_num_threads()
            torch.set_num_threads(1)
            one = _seconds_per_step(tr)
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
        (run_dir / "config.yaml").write_text(dump_yaml(resolved_dict(recipe, tr.model.config)))
        print(f"{per_step:.2f}s per step on this machine: training {t.max_steps} steps "
              f"({t.max_steps * t.batch_size * run.info['seq_len']:,} tokens)", flush=True)
    before = tr.evaluate()
    print(f"before training: val loss {before['loss']:.3f}  ppl {before['ppl']:.1f}", flush=True)
    result = tr.fit(resume=resume)
    if result.exit_code:
        return result.exit_code
    after = tr.evaluate()
    llm = load(run_dir / "model")
    texts = samples(llm, recipe.run.samples, recipe.run.sample_tokens, recipe.run.sample_prompt,
                    seed=recipe.train.seed)
    print(f"after {result.step} steps ({result.elapsed:.0f}s, {result.tokens_per_s:,.0f} tok/s): "
          f"val loss {after['loss']:.3f}  ppl {after['ppl']:.1f}  (before: {before['loss']:.3f} / "
          f"{before['ppl']:.1f})")
    for temp, outs in texts.items():
        for s in outs:
            print(f"\n--- sample, temperature {temp} ---\n{recipe.run.sample_prompt}{s}")
    print(f"\nmodel folder: {run_dir / 'model'}   try: lmforge generate \"Romeo.\" --model {run_dir / 'model'}")
    print(f"total wall time {time.perf_counter() - t_all:.0f}s")
    return 0
