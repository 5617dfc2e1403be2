"""The one run builder: a validated `Recipe` -> tokenizer, data, model, objective, `Trainer`.

`pretrain`, `finetune` and `align` (and `quickstart`) all start a run with `build_run`; none of them
builds these pieces itself. In order:

0. processes (`distributed.setup_recipe`): under torchrun, the process group, the same recipe on every
   rank (config hash) and the per-rank micro-batch from `train.global_batch`;
1. run folder: refuse a fresh start over checkpoints (`checkpoint.check_resume`), set threads;
2. tokenizer and model (`build_model`): `model.preset` builds a fresh, seeded model (tokenizer from
   `tokenizer.path`, trained BPE or teenyGPT's chars); `model.source` loads a pretrained model with
   `lmforge.load` (a model folder, .gguf or short name such as smollm2) and its own tokenizer
   (unless `tokenizer.path` names another);
3. data (`build_data`): `DATA_KINDS[data.kind]` (`lmforge.train.recipe`) -> a `RunData` (the training
   `BatchSource`, the test split's batches, facts for the log). A new kind is one entry, "module:function",
   with the signature `fn(recipe, tokenizer, run_dir, seq_len) -> RunData`;
4. config.yaml: the resolved recipe (what reproduces the run);
5. model preparation: the recipe's `adapter` section (LoRA, DoRA, ... as module swaps, `lmforge.adapt`),
   then the caller's `prepare_model(model) -> model`, if any;
6. objective: the caller's, or `build_objective(train.objective, ...)`;
7. the one `Trainer`.

    run = build_run(load_recipe("recipes/teenygpt.yaml"), resume="auto")
    result = run.trainer.fit(resume="auto")
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_bytes
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed
from lmforge.train.batches import BatchSource, PaddedSequences, TokenWindows, padded_batches
from lmforge.train.objectives import Objective, build_objective
from lmforge.train.recipe import DATA_KINDS, Recipe, dump_yaml
from lmforge.train.trainer import Trainer


@dataclass
class RunData:
    """What a data kind gives a run."""

    source: BatchSource  # training batches (+ validation batches, state for exact resume)
    test_batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None  # the test split, if any
    test_seqs: torch.Tensor | None = None  # passages: the test split's padded sequences
    info: dict[str, Any] = field(default_factory=dict)


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
    dist: distributed.DistEnv = field(default_factory=distributed.DistEnv)  # rank 0 alone reports

    @property
    def model(self) -> nn.Module:
        """The model being trained."""
        return self.trainer.model


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---- tokenizer and model ----------------------------------------------------------------------

def build_tokenizer(recipe: Recipe, run_dir: Path):
    """The recipe's tokenizer: loaded from tokenizer.path, teenyGPT's chars, or one of tokenizer.kind trained
    (once) into the run."""
    from lmforge.tokenizers import CharTokenizer, load_tokenizer

    tk = recipe.tokenizer
    if tk.path is not None:
        return load_tokenizer(tk.path)
    if tk.kind == "char":
        return CharTokenizer()
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():  # made by an earlier (possibly interrupted) start of this run
        return load_tokenizer(folder)
    from lmforge.data import iter_documents
    from lmforge.tokenizers.train import train_tokenizer_kind

    t0 = time.perf_counter()
    tok, label = train_tokenizer_kind(tk.kind, iter_documents(recipe.data.source, "train"), tk.vocab_size,
                                      tk.min_frequency, tk.sentinels)
    tok.save(folder)
    _log(f"trained a {label} tokenizer ({tok.vocab_size} tokens) on {recipe.data.source} in "
         f"{time.perf_counter() - t0:.1f}s -> {folder}")
    return tok


def build_model(recipe: Recipe, run_dir: Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer): a fresh seeded model of `model.preset`, or the pretrained `model.source`."""
    if recipe.model.get("source"):
        from lmforge.llm import load

        # training needs float weights: a GGUF's quantized blocks are expanded; QLoRA takes them as they are
        # and re-quantizes to NF4 one layer at a time (the fp32 model is never whole in memory)
        if recipe.adapter.method == "qlora" and recipe.train.keep_memory:
            from lmforge.train.allocator import allocator_for, apply_allocator

            # the Trainer's setting, in force before loading: re-quantizing's temporaries go back to the OS
            apply_allocator(allocator_for(recipe.train.allocator, nf4=True))
        llm = load(recipe.model["source"], dtype=recipe.model.get("dtype"),
                   dequantize=recipe.adapter.method != "qlora" or recipe.adapter.path is not None)
        tok = llm.tokenizer
        if recipe.tokenizer.path is not None:
            from lmforge.tokenizers import load_tokenizer

            tok = load_tokenizer(recipe.tokenizer.path)
        if tok is None:
            raise ConfigError(f"model.source {recipe.model['source']!r} has no tokenizer; set tokenizer.path to "
                              "a folder holding its tokenizer.json")
        if tok.vocab_size > llm.model.config.vocab_size:
            raise ConfigError(f"the tokenizer's vocabulary ({tok.vocab_size}) is larger than the model's "
                              f"({llm.model.config.vocab_size}); use the model's own tokenizer")
        return llm.model.train(), tok
    from lmforge.models import make_model

    tok = build_tokenizer(recipe, run_dir)
    cfg = recipe.model_config(vocab_size=tok.vocab_size)
    if cfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tok.vocab_size}); drop model.vocab_size to follow the tokenizer")
    set_ids = {k: v for k, v in (("bos_id", tok.bos_id), ("eos_id", tok.eos_id), ("pad_id", tok.pad_id))
               if k not in recipe.model}
    torch.manual_seed(recipe.train.seed)  # the model's initial weights depend on the seed only
    return make_model(cfg.replace(**set_ids)), tok


# ---- data -------------------------------------------------------------------------------------

def token_data(recipe: Recipe, tok, run_dir: Path, seq_len: int) -> RunData:
    """`data.kind: tokens`: random windows of prepared shards (prepared into the run unless data.path)."""
    from lmforge.data import TokenShard, prepare

    dt, t = recipe.data, recipe.train
    folder = Path(dt.path) if dt.path else run_dir / "data"
    if dt.path is None and not (distributed.rank() > 0 and (folder / "manifest.json").is_file()):  # rank 0 made it
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
        # the global micro-batch: the same test windows at every world size
        probe = TokenWindows(shards["train"].tokens, t.batch_size * distributed.world_size(), seq_len,
                             val_tokens=test.tokens,
                             eval_batches=t.eval_batches)
        test_batches = probe.eval_batches
    return RunData(source, test_batches, None, {"train_tokens": len(shards["train"]), "data_dir": str(folder)})


def passage_data(recipe: Recipe, tok, run_dir: Path, seq_len: int) -> RunData:
    """`data.kind: passages`: teenyGPT's fixed-length padded passages, shuffled per epoch."""
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
    return RunData(source, test_batches, test, {"train_sequences": len(seqs["train"]),
                                                "val_sequences": len(seqs["val"]),
                                                "test_sequences": len(seqs["test"]),
                                                "steps_per_epoch": source.steps_per_epoch})


def instruction_data(recipe: Recipe, tok, run_dir: Path, seq_len: int) -> RunData:
    """`data.kind: instructions`: rendered, masked (and optionally packed) examples of chat / prompt-response
    JSONL (`lmforge.data.instruct`)."""
    from lmforge.data.instruct import InstructionBatches, collate, load_splits, pad_id_of, render_rows

    dt, t = recipe.data, recipe.train
    splits = {k: v[:dt.max_sequences] for k, v in load_splits(dt.source, dt.val_source, dt.val_fraction,
                                                               t.seed).items()}
    ex = {s: render_rows(tok, rows, seq_len + 1, dt.prompt_loss) for s, rows in splits.items()}
    pad = pad_id_of(tok)
    source = InstructionBatches(ex["train"], t.batch_size, pad, seq_len, seed=t.seed, val=ex["val"], pack=dt.pack)
    test = ex["test"]
    test_batches = (lambda: (collate(test[i:i + t.batch_size], pad) for i in range(0, len(test), t.batch_size))) \
        if test else None
    n_tok = sum(len(e.ids) for e in ex["train"])
    return RunData(source, test_batches, None, {
        "train_examples": len(ex["train"]), "val_examples": len(ex["val"]), "test_examples": len(test),
        "train_tokens": n_tok, "learned_tokens": sum(sum(e.mask[1:]) for e in ex["train"]),
        "steps_per_epoch": source.steps_per_epoch})


def build_data(recipe: Recipe, tok, run_dir: Path, seq_len: int) -> RunData:
    """The `RunData` of `data.kind` (see `DATA_KINDS`)."""
    kind = recipe.data.kind
    if kind not in DATA_KINDS:
        raise ConfigError(f"data.kind {kind!r} is unknown; available: {', '.join(DATA_KINDS)}")
    return _resolve(DATA_KINDS[kind])(recipe, tok, run_dir, seq_len)


# ---- the run ----------------------------------------------------------------------------------

def resolved_dict(recipe: Recipe, cfg) -> dict[str, Any]:
    """The recipe with every default filled in and the model fully spelled out (config.yaml)."""
    d = recipe.to_dict()
    if not recipe.model.get("source"):
        d["model"] = {"preset": recipe.model["preset"], **cfg.to_dict()}
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _write_config(recipe: Recipe, cfg, run_dir: Path, resume: str | None) -> None:
    resolved = resolved_dict(recipe, cfg)
    cfg_path = run_dir / "config.yaml"
    if resume and cfg_path.exists():
        import yaml

        diff = _diff(yaml.safe_load(cfg_path.read_text()) or {}, resolved)
        if diff:
            _log(f"warning: resuming with a config that differs from {cfg_path}: {', '.join(diff[:8])}")
    atomic_write_bytes(cfg_path, dump_yaml(resolved).encode())


def build_run(recipe: Recipe, resume: str | None = None, *,
              prepare_model: Callable[[nn.Module], nn.Module] | None = None,
              objective: Objective | Callable[[nn.Module], Objective] | None = None) -> Run:
    """Tokenizer, data, model, objective and `Trainer` for a validated recipe; writes config.yaml.

    Args:
        recipe: a validated `Recipe` (`load_recipe` / `from_dict`).
        resume: as `Trainer.fit`'s; a fresh start refuses a run folder that has checkpoints.
        prepare_model: applied to the model after the recipe's adapter (e.g. a value head for PPO).
        objective: used instead of `build_objective(recipe.train.objective, ...)`; a callable gets the
            prepared model (objectives whose heads or reference depend on it: reward, DPO, PPO).
    """
    t = recipe.train
    env = distributed.setup_recipe(recipe, recipe.to_dict())  # before any rank does work
    run_dir = Path(recipe.run.dir)
    ckpt.check_resume(run_dir, resume)
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    with distributed.main_first(env):  # rank 0 trains the tokenizer and prepares data; the others reuse them
        model, tok = build_model(recipe, run_dir)
        cfg = model.config
        seq_len = t.seq_len or cfg.block_size
        if seq_len > cfg.block_size:
            raise ConfigError(f"train.seq_len ({seq_len}) exceeds the model's context ({cfg.block_size})")
        data = build_data(recipe, tok, run_dir, seq_len)
    if env.is_main:
        _write_config(recipe, cfg, run_dir, resume)

    info = dict(data.info)
    if recipe.adapter.method != "full":
        from lmforge.adapt import apply_adapter, trainable_parameters

        torch.manual_seed(t.seed)  # adapter initialisation depends on the seed only
        model = apply_adapter(model, recipe.adapter, total_steps=t.max_steps * t.grad_accum)
        info["trainable"] = trainable_parameters(model)["trainable"]
    if prepare_model is not None:
        model = prepare_model(model)
    if objective is not None and not isinstance(objective, Objective):
        objective = objective(model)
    if objective is None:
        try:
            objective = build_objective(t.objective, reduction=t.loss_reduction, mask_padding=t.mask_padding,
                                        **t.objective_args)
        except ValueError as e:
            raise ConfigError(f"train.objective: {e}") from None
        if hasattr(objective, "bind"):  # objectives that need the tokenizer ([MASK] id, word boundaries)
            objective.bind(tok)
        if hasattr(objective, "attach"):  # objectives with a head sized by the model (task heads)
            objective.attach(model)
    trainer = Trainer(model, objective, data.source, t, recipe.optim, run_dir=run_dir, tokenizer=tok)
    src = recipe.model.get("source")
    if recipe.adapter.method != "full" and src:  # adapter-only checkpoints: the base is rebuilt from its source
        path = Path(src).expanduser()
        trainer.base_source = {"source": str(path.resolve()) if path.exists() else src,
                               "dtype": recipe.model.get("dtype")}
        if recipe.adapter.method == "qlora":  # the base the adapters see is the NF4 one
            trainer.base_source["nf4"] = {"blocksize": recipe.adapter.quant_blocksize,
                                          "double_quant": recipe.adapter.double_quant}
    info.update(params=model.num_params(),
                flops_per_token=model.estimate_flops(seq_len), seq_len=seq_len)
    return Run(recipe, run_dir, tok, trainer, data.test_batches, data.test_seqs, info, env)
