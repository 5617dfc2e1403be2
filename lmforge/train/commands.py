"""`lmforge pretrain`: a YAML recipe -> tokenizer, data, model -> the one `Trainer` -> a run folder.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_bytes, write_json
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed
from lmforge.train.batches import PaddedSequences, TokenWindows, padded_batches
from lmforge.train.objectives import CausalLM, build_objective
from lmforge.train.recipe import Recipe, dump_yaml, load_recipe
from lmforge.train.trainer import Trainer, TrainResult, evaluate


@dataclass
class Run:
    """Everything a recipe resolves to, ready to `trainer.fit()`."""

    recipe: Recipe
    run_dir: Path
    tokenizer: Any
    trainer: Trainer
    test_batches: Any = None  # () -> iterator of batches on the test split, when the data has one
    test_seqs: torch.Tensor | None = None  # passages: the test split's padded sequences
    info: dict[str, Any] = field(default_factory=dict)
    dist: distributed.DistEnv = field(default_factory=distributed.DistEnv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_tokenizer(recipe: Recipe, run_dir: Path):
    """The recipe's tokenizer: loaded from tokenizer.path, teenyGPT's chars, or BPE trained (once) into the run."""
    from lmforge.tokenizers import CharTokenizer, load_tokenizer, train_bpe

    tk = recipe.tokenizer
    if tk.path is not None:
        return load_tokenizer(tk.path)
    if tk.kind == "char":
        return CharTokenizer()
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():  # made by an earlier (possibly interrupted) start of this run
        return load_tokenizer(folder)
    from lmforge.data import iter_documents

    t0 = time.perf_counter()
    tok = train_bpe(iter_documents(recipe.data.source, "train"), vocab_size=tk.vocab_size,
                    min_frequency=tk.min_frequency)
    tok.save(folder)
    _log(f"trained a byte-level BPE tokenizer ({tok.vocab_size} tokens) on {recipe.data.source} in "
         f"{time.perf_counter() - t0:.1f}s -> {folder}")
    return tok


def _token_data(recipe: Recipe, run_dir: Path, tok, seq_len: int, build: bool = True, world: int = 1):
    from lmforge.data import TokenShard, prepare

    dt, t = recipe.data, recipe.train
    folder = Path(dt.path) if dt.path else run_dir / "data"
    if dt.path is None and (build or not (folder / "manifest.json").is_file()):
        kwargs: dict[str, Any] = {}
        if tok.eos_id is None:  # teenyGPT's vocabulary has no EOS: BOS starts the next document
            kwargs = {"sep_id": tok.bos_id if tok.bos_id is not None else tok.pad_id}
            if hasattr(tok, "normalize"):
                kwargs["normalize"] = tok.normalize
        t0 = time.perf_counter()
        prepare(dt.source, tok, folder, progress=False, **kwargs)
        _log(f"prepared {dt.source} -> {folder} in {time.perf_counter() - t0:.1f}s")
    shards = {}
    for split in ("train", "val", "test"):
        try:
            shards[split] = TokenShard.open(folder, split)
        except ConfigError:
            if split == "train":
                raise
    shards["train"].check_tokenizer(tok)
    val = shards.get("val")
    source = TokenWindows(shards["train"].tokens, t.batch_size, seq_len, seed=t.seed,
                          val_tokens=val.tokens if val is not None and len(val) > seq_len + 1 else None,
                          eval_batches=t.eval_batches)
    test = shards.get("test")
    test_batches = None
    if test is not None and len(test) > seq_len + 1:
        probe = TokenWindows(shards["train"].tokens, t.batch_size * world, seq_len, val_tokens=test.tokens,
                             eval_batches=t.eval_batches)
        test_batches = probe.eval_batches
    return source, test_batches, {"train_tokens": len(shards["train"]), "data_dir": str(folder)}


def _passage_data(recipe: Recipe, tok):
    from lmforge.train.teeny import passage_sequences

    dt, t = recipe.data, recipe.train
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if pad is None:
        raise ConfigError("data.kind: passages needs a tokenizer with a pad (or EOS) token")
    seqs = {s: passage_sequences(tok, dt.source, s, dt.max_chars)[:dt.max_sequences] for s in ("train", "val", "test")}
    source = PaddedSequences(seqs["train"], t.batch_size, pad, seed=t.seed,
                             val_seqs=seqs["val"] if len(seqs["val"]) else None)
    test = seqs["test"] if len(seqs["test"]) else None
    test_batches = (lambda: padded_batches(test, t.batch_size, pad)) if test is not None else None
    return source, test_batches, test, {"train_sequences": len(seqs["train"]), "val_sequences": len(seqs["val"]),
                                        "test_sequences": len(seqs["test"]),
                                        "steps_per_epoch": source.steps_per_epoch}


def resolved_dict(recipe: Recipe, cfg) -> dict[str, Any]:
    """The recipe with every default filled in and the model fully spelled out (config.yaml)."""
    d = recipe.to_dict()
    d["model"] = {"preset": recipe.model["preset"], **cfg.to_dict()}
    return d


def setup_run(recipe: Recipe, resume: str | None = None) -> Run:
    """Tokenizer, data, model, objective and `Trainer` for a validated recipe; writes config.yaml."""
    from lmforge.models import DecoderLM

    t = recipe.train
    env = distributed.setup_recipe(recipe, recipe.to_dict())  # process group, same recipe on all ranks, batch
    run_dir = Path(recipe.run.dir)
    ckpt.check_resume(run_dir, resume)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    with distributed.main_first(env):  # rank 0 trains the tokenizer / prepares data; the others reuse them
        tok = build_tokenizer(recipe, run_dir)
        if recipe.data.kind == "tokens" and env.is_main:
            _token_data(recipe, run_dir, tok, t.seq_len or recipe.model_config(tok.vocab_size).block_size)
    cfg = recipe.model_config(vocab_size=tok.vocab_size)
    if cfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tok.vocab_size}); drop model.vocab_size to follow the tokenizer")
    set_ids = {k: v for k, v in (("bos_id", tok.bos_id), ("eos_id", tok.eos_id), ("pad_id", tok.pad_id))
               if k not in recipe.model}
    cfg = cfg.replace(**set_ids)
    seq_len = t.seq_len or cfg.block_size
    test_seqs = None
    if recipe.data.kind == "tokens":
        source, test_batches, info = _token_data(recipe, run_dir, tok, seq_len, build=False,
                                                 world=env.world_size)
    else:
        source, test_batches, test_seqs, info = _passage_data(recipe, tok)

    resolved = resolved_dict(recipe, cfg)
    cfg_path = run_dir / "config.yaml"
    if resume and cfg_path.exists():
        import yaml

        old = yaml.safe_load(cfg_path.read_text()) or {}
        diff = _diff(old, resolved)
        if diff:
            _log(f"warning: resuming with a config that differs from {cfg_path}: {', '.join(diff[:8])}")
    atomic_write_bytes(cfg_path, dump_yaml(resolved).encode())

    torch.manual_seed(t.seed)  # the model's initial weights depend on the seed only
    model = DecoderLM(cfg)
    objective = build_objective(t.objective, reduction=t.loss_reduction, mask_padding=t.mask_padding)
    trainer = Trainer(model, objective, source, t, recipe.optim, run_dir=run_dir, tokenizer=tok)
    info.update(params=model.num_params(), flops_per_token=model.estimate_flops(seq_len), seq_len=seq_len)
    return Run(recipe, run_dir, tok, trainer, test_batches, test_seqs, info, env)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def samples(llm, n: int, max_new_tokens: int, prompt: str = "", seed: int = 0,
            temperatures: tuple[float, ...] = (0.1, 1.0)) -> dict[str, list[str]]:
    """`n` samples per temperature; an empty prompt starts from BOS (or the end-of-text token)."""
    tok = llm.tokenizer
    if not prompt and not llm.encode_prompt(""):
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        prompt = tok.id_to_token(start) if start is not None else "\n"
    out: dict[str, list[str]] = {}
    for temp in temperatures:
        out[str(temp)] = [llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=temp, seed=seed + i)
                          for i in range(n)]
    return out


def final_report(run: Run, result: TrainResult) -> dict[str, Any]:
    """Test-split metrics and samples of the run's model (the best one when early stopping kept one)."""
    from lmforge.llm import load

    recipe, t = run.recipe, run.recipe.train
    folder = run.run_dir / ("best" if t.patience > 0 and (run.run_dir / "best").is_dir() else "model")
    report: dict[str, Any] = {"model_folder": str(folder), "step": result.step, "stopped": result.stopped,
                              "elapsed_s": round(result.elapsed, 1), "val": result.val, **run.info}
    if not folder.is_dir():
        return report
    llm = load(folder)
    if run.test_seqs is not None:
        from lmforge.train.teeny import sequence_report

        report["test"] = sequence_report(llm.model, run.test_seqs, run.tokenizer.pad_id, dtype=t.dtype)
    elif run.test_batches is not None:
        report["test"] = evaluate(llm.model, CausalLM(), run.test_batches(), t.dtype)
    if recipe.run.samples:
        report["samples"] = samples(llm, recipe.run.samples, recipe.run.sample_tokens, recipe.run.sample_prompt,
                                    seed=t.seed)
    write_json(run.run_dir / "test_metrics.json", report)
    return report


def print_report(report: dict[str, Any]) -> None:
    """Human-readable summary of `final_report`."""
    print(f"model: {report['model_folder']} (step {report['step']}, stopped by {report['stopped']}, "
          f"{report['elapsed_s']}s of training)")
    if report.get("val"):
        v = report["val"]
        print(f"validation: loss {v['loss']:.4f}  ppl {v['ppl']:.2f}  acc {v['acc']:.4f}")
    test = report.get("test")
    if test and "nll_per_seq_masked" in test:
        print(f"test ({int(test['sequences'])} sequences): NLL/seq masked {test['nll_per_seq_masked']:.2f} nats, "
              f"unmasked {test['nll_per_seq_unmasked']:.2f} nats; acc masked {test['acc_masked']:.4f}, unmasked "
              f"{test['acc_unmasked']:.4f}; NLL/token masked {test['nll_per_token_masked']:.4f}")
    elif test:
        print(f"test: loss {test['loss']:.4f}  ppl {test['ppl']:.2f}  acc {test['acc']:.4f}")
    for temp, texts in (report.get("samples") or {}).items():
        for s in texts:
            print(f"sample (temperature {temp}): {s!r}")


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
    try:
        run = setup_run(recipe, resume)
        if run.dist.is_main:
            _log(f"{run.run_dir}: {run.info['params']:,} parameters, "
                 + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in run.info.items()
                             if k != "params"))
        result = run.trainer.fit(resume=resume)
    finally:
        distributed.shutdown()
    if result.exit_code or not run.dist.is_main:  # rank 0 alone reports
        return result.exit_code
    report = final_report(run, result)
    print_report(report)
    print(json.dumps({k: report[k] for k in ("step", "stopped", "val", "test") if k in report}))
    return 0
