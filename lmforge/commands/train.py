"""The training stage's commands: `lmforge pretrain`, `quickstart`, `ngram` and `finetune`.

`pretrain`: a YAML recipe -> the run builder (`lmforge.train.run`) -> the one `Trainer` -> a run folder.

    lmforge pretrain --config recipes/gpt2-124m/pretrain.yaml --set train.max_steps=10 model.n_layer=2
    lmforge pretrain --config recipes/teenygpt.yaml --resume auto

The run folder (`run.dir`) gets config.yaml (the resolved recipe: re-running it reproduces the run),
tokenizer/ and data/ (when the recipe builds them), checkpoints/step-N/, metrics.jsonl, curves.png,
model/ (final weights), best/ (lowest validation loss, with early stopping) and test_metrics.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

from lmforge.errors import ConfigError
from lmforge.io import write_json
from lmforge.train.finetune import Method, choice_accuracy, finetune_recipe
from lmforge.train.recipe import load_recipe
from lmforge.train.report import final_report, print_report, samples
from lmforge.train.run import build_run


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pretrain(config: str | None = None, set_: list[str] | None = None, resume: str = "none") -> int:
    """Pre-train a model from a YAML recipe (model preset, tokenizer, data, train/optim settings, run folder).

    The recipe and overrides are validated before any work starts. Ctrl-C / SIGTERM save a checkpoint and
    exit (code 130 / 143); `--resume auto` continues from the newest whole checkpoint, bit-identically.

    Args:
        config: the recipe YAML, e.g. recipes/gpt2-124m/pretrain.yaml.
        set_: overrides as dotted key=value items, e.g. --set train.max_steps=10 model.n_layer=2 optim.lr=1e-3
        resume: "none" (fresh run; refuses a run folder with checkpoints), "auto" (newest whole checkpoint)
            or a checkpoints/step-N folder.
    """
    if not config:
        raise ConfigError("pass --config with a recipe, e.g. --config recipes/gpt2-124m/pretrain.yaml")
    recipe = load_recipe(config, set_ or [])
    run = build_run(recipe, resume)
    if run.dist.is_main:
        _log(f"{run.run_dir}: {run.info['params']:,} parameters, "
             + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in run.info.items()
                         if k != "params"))
    result = run.trainer.fit(resume=resume)
    if result.exit_code or not run.dist.is_main:  # rank 0 alone reports
        return result.exit_code
    report = final_report(run, result)
    print_report(report)
    print(json.dumps({k: report[k] for k in ("step", "stopped", "val", "test") if k in report}))
    return 0


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
    from lmforge.train.quickstart import clear_run, fit_to_budget, quickstart_recipe

    if time_budget <= 0 or steps < 1:
        raise ConfigError(f"--steps must be >= 1 and --time-budget > 0, got {steps} and {time_budget}")
    t_all = time.perf_counter()
    dtype = train_dtype(dtype, what="quickstart --dtype")
    recipe = quickstart_recipe(steps, out, vocab_size, dtype, threads, progress, set_ or [])
    run_dir = Path(out)
    if overwrite:  # a fresh model each time; the tokenizer and tokenized data are kept when they match
        clear_run(run_dir, recipe)
    resume = None if overwrite else "auto"
    run = build_run(recipe, resume=resume)
    tr = run.trainer
    print(f"quickstart: {run.info['params'] / 1e6:.2f}M-parameter decoder, vocab {run.tokenizer.vocab_size}, "
          f"{run.info['train_tokens']:,} training tokens; tokenizer + data ready in "
          f"{time.perf_counter() - t_all:.1f}s", flush=True)
    if overwrite:
        fit_to_budget(run, steps, time_budget, threads)
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


def ngram(tokenizer: str, output: str = "runs/ngram", data: str = "shakespeare", order: int = 3,
          method: Literal["kneser_ney", "backoff"] = "kneser_ney", data_dir: str | None = None) -> int:
    """Fit an n-gram LM (Kneser-Ney or backoff) on a corpus's train split and save it as a model folder.

    Score it like any model: lmforge eval perplexity --model OUTPUT --data shakespeare

    Examples:
    lmforge ngram runs/quickstart/model --output runs/ngram-kn4 --order 4
    lmforge ngram runs/quickstart/model --output runs/ngram-bo4 --order 4 --method backoff

    Args:
        tokenizer: a model folder or tokenizer.json whose tokenizer to count with (use the transformer's to
          compare perplexity per token).
        output: the model folder to write (config.json, ngram.safetensors, tokenizer.json).
        data: "shakespeare" (its train split) or a .txt/.md/.jsonl file or folder.
        order: n of the n-grams (3: trigrams).
        method: kneser_ney (interpolated modified Kneser-Ney) or backoff (absolute-discount backoff).
        data_dir: a folder prepared with this tokenizer (e.g. runs/quickstart/data) to count instead of --data.
    """
    if not Path(tokenizer).exists():
        raise ConfigError(f"tokenizer {tokenizer}: no such folder or file; pass a model folder (e.g. "
                          "runs/quickstart/model after lmforge quickstart) or a tokenizer.json")
    from lmforge.train.ngram import fit_ngram

    t0 = time.perf_counter()
    llm = fit_ngram(tokenizer, data, order, method, data_dir)
    llm.save(output)
    cfg = llm.config
    print(f"{cfg.name}: {llm.model.num_params():,} n-grams from {cfg.train_tokens:,} tokens in "
          f"{time.perf_counter() - t0:.1f}s -> {output}", file=sys.stderr)
    print(f"score it: lmforge eval perplexity --model {output} --data {data}", file=sys.stderr)
    return 0


def finetune(config: str | None = None, method: Method | None = None, model: str | None = None,
             data: str | None = None, out: str | None = None, set_: list[str] | None = None,
             resume: str = "none") -> int:
    """Fine-tune a pretrained model on instructions: in full, or LoRA, DoRA, QLoRA, AdaLoRA, adapters, prefix/prompt.

    Without --config the defaults are: SmolLM2-135M-Instruct, the built-in shakespeare-instruct set,
    100 steps of batch 8 at up to 256 tokens, LoRA r=8 on q/k/v/o. Ctrl-C saves a checkpoint;
    --resume auto continues bit-identically.

    Args:
        config: a recipe YAML, e.g. recipes/smollm2-135m/lora.yaml (sections as pretrain's, plus adapter).
        method: full | lora | dora | qlora | adalora | adapter (Houlsby bottleneck) | prefix | prompt (prefix / prompt
            tuning); sets adapter.method.
        model: what to fine-tune: a model folder, .gguf file or short name (smollm2), with its tokenizer.
        data: a built-in set (shakespeare-instruct) or a .jsonl file of messages / prompt-response lines.
        out: the run folder (default runs/finetune-<method>).
        set_: overrides as dotted key=value items, e.g. --set adapter.r=16 train.max_steps=50 optim.lr=1e-4
        resume: "none" (fresh run), "auto" (newest whole checkpoint) or a checkpoints/step-N folder.
    """
    from lmforge.adapt import format_trainable, trainable_parameters

    recipe = finetune_recipe(config, method, model, data, out, set_)
    run = build_run(recipe, resume)
    rep = trainable_parameters(run.model)
    print(f"{run.run_dir}: {recipe.adapter.method}, {format_trainable(rep)}; "
          + ", ".join(f"{k} {v:,}" for k, v in run.info.items() if isinstance(v, int) and k != "trainable"),
          file=sys.stderr, flush=True)
    result = run.trainer.fit(resume=resume)
    if result.exit_code or not run.dist.is_main:  # under torchrun, rank 0 alone reports
        return result.exit_code
    extra = None
    if recipe.data.kind == "instructions":
        from lmforge.data.instruct import load_splits

        test = load_splits(recipe.data.source, recipe.data.val_source, recipe.data.val_fraction,
                           recipe.train.seed)["test"][:recipe.data.max_sequences]
        if test:
            def extra(llm):  # on the model the report is about, not a second copy of it
                return choice_accuracy(llm.model, llm.tokenizer, test)
    report = final_report(run, result, extra)
    report["trainable"] = rep
    write_json(run.run_dir / "test_metrics.json", report)
    print_report(report)
    if "choice_acc" in report.get("test", {}):
        print(f"test multiple-choice accuracy: {report['test']['choice_acc']:.3f} "
              f"({int(report['test']['choice_n'])} questions)")
    print(json.dumps({k: report[k] for k in ("step", "stopped", "val", "test", "trainable") if k in report}))
    return 0
