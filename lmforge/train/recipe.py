"""YAML recipes: load, apply `key=value` overrides, validate everything before any work starts.

A recipe has eight sections (every key optional except model.preset or model.source; defaults are the
dataclasses'):

    model:      preset: <name>, then any `Config` field (nested or dotted) overriding the preset; or
                source: a pretrained model (folder, .gguf, short name such as smollm2) and optional dtype
    tokenizer:  path (a folder with tokenizer.json) or kind: bpe | wordpiece | unigram (trained on the data) |
                char (teenyGPT)
    data:       kind: tokens (random windows of prepared shards) | passages (teenyGPT's padded lines) |
                stream (consecutive segments of contiguous streams, for segment_lm: Transformer-XL) |
                instructions (chat / prompt-response JSONL for fine-tuning), see `DATA_KINDS`;
                path (a prepared folder) or source (an embedded corpus / file, prepared into the run)
    train:      `TrainConfig` (loop, evaluation, checkpoints, dtype, threads)
    optim:      `OptimConfig` (AdamW, schedule, clipping)
    adapter:    `AdapterConfig` (full fine-tuning, or LoRA / DoRA / ... module swaps and their settings)
    align:      `AlignConfig` (`lmforge align`: DPO-family / reward / PPO settings)
    run:        dir (the run folder), samples

Overrides use dotted keys and YAML values: `train.max_steps=10`, `model.n_layer=2`, `optim.lr=1e-3`.
Errors are `ConfigError`s naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.adapt.config import AdapterConfig
from lmforge.align.config import AlignConfig
from lmforge.config import Config
from lmforge.errors import ConfigError, FormatError
from lmforge.models.mixers import check_mixers
from lmforge.presets import get_preset
from lmforge.train.optim import OptimConfig
from lmforge.train.trainer import TrainConfig
from lmforge.train.typed import coerce


@dataclass
class TokenizerConfig:
    """Which tokenizer: an existing folder, or one built for the run (saved in `<run.dir>/tokenizer`)."""

    path: str | None = None  # folder holding tokenizer.json; wins over `kind`
    # bpe / wordpiece / unigram (T5's SentencePiece kind, with <extra_id_N> sentinels): trained on data.source's
    # train split
    kind: Literal["bpe", "char", "wordpiece", "unigram"] = "bpe"
    vocab_size: int = 4096  # bpe / wordpiece / unigram
    min_frequency: int = 2  # bpe / wordpiece
    sentinels: int = 100  # unigram: <extra_id_0..N-1> tokens for span corruption (T5: 100)


# data.kind -> "module:function" building its `lmforge.train.run.RunData` (imported only when a run uses it)
DATA_KINDS: dict[str, str] = {
    "tokens": "lmforge.train.run:token_data",
    "passages": "lmforge.train.run:passage_data",
    "stream": "lmforge.train.segments:stream_data",
    "instructions": "lmforge.train.run:instruction_data",
    "genre": "lmforge.train.classify:genre_data_kind",
    "preferences": "lmforge.align.recipe:preference_data",
    "prompts": "lmforge.align.recipe:prompt_data",
}


@dataclass
class DataConfig:
    """Where batches come from."""

    kind: str = "tokens"  # tokens | passages | instructions (DATA_KINDS)
    path: str | None = None  # tokens: a prepared folder (manifest.json, train.bin, val.bin); null: prepare `source`
    source: str = "shakespeare"  # embedded corpus name, or a .txt/.md/.jsonl file or folder; instructions: a
    # built-in set (shakespeare-instruct) or a .jsonl file
    val_source: str | None = None  # instructions: a .jsonl validation file; null: the built-in split / a slice
    val_fraction: float = 0.05  # instructions from one file: this share held out for validation
    prompt_loss: bool = False  # instructions: count the loss on prompt (system/user) tokens too
    pack: bool = False  # instructions: pack several examples per row (attention kept within each example)
    max_chars: int = 149  # passages: characters per passage (+ BOS, padded to max_chars + 1 tokens)
    max_sequences: int | None = None  # passages, instructions: only the first N of each split (quick trials, tests)


@dataclass
class RunConfig:
    """The run folder and what to show at the end."""

    dir: str = "runs/pretrain"
    samples: int = 2  # samples printed at each of temperature 0.1 and 1.0 at the end; 0: none
    sample_tokens: int = 100
    sample_prompt: str = ""  # "" starts from BOS (or the end-of-text token)


SECTIONS = {"tokenizer": TokenizerConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
            "adapter": AdapterConfig, "align": AlignConfig, "run": RunConfig}


@dataclass
class Recipe:
    """A validated recipe; `model_config` is the resolved model `Config` (vocab from the tokenizer)."""

    model: dict[str, Any]
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = ""  # the file it came from

    def model_config(self, vocab_size: int | None = None) -> Config:
        """The preset with the recipe's overrides; vocab_size follows the tokenizer unless the recipe sets it.

        A pretrained `model.source` has no preset: its config comes with its weights (`run.build_model`).
        """
        if self.model.get("source"):
            raise ConfigError("model.source: the config comes from the pretrained model; load it with lmforge.load")
        overrides = {k: v for k, v in _flatten(self.model).items() if k != "preset"}
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        try:  # the mixers' own settings too, so that a bad one stops the run before anything is built
            return check_mixers(get_preset(self.model["preset"]).replace(**overrides))
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml holds)."""
        out: dict[str, Any] = {"model": dict(self.model)}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out


# ---- parsing -------------------------------------------------------------------------------------

def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rope_scaling":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`"train.max_steps=10"` -> ("train.max_steps", 10); the value is read as YAML (numbers, true, null...)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.max_steps=10)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating sub-dicts), returning the dict."""
    for item in overrides:
        key, value = parse_override(item)
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[leaf] = value
    return d


def _section(cls, d: Any, name: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{name} must be a mapping of keys to values, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in d.items():
        if k not in fields:
            near = difflib.get_close_matches(str(k), fields, n=1)
            hint = f" (did you mean {name}.{near[0]}?)" if near else ""
            raise ConfigError(f"unknown field {name}.{k}{hint}; allowed: {', '.join(fields)}")
        kwargs[k] = coerce(v, hints[k], f"{name}.{k}")
    return cls(**kwargs)


def _check_model_types(model: dict[str, Any]) -> None:
    """Type-check model overrides against `Config` and its sub-configs."""
    from lmforge import config as cfg_mod

    if model.get("source") is not None:
        extra = [k for k in model if k not in ("source", "dtype")]
        if extra or "preset" in model:
            raise ConfigError(f"model.source (a pretrained model) takes only model.dtype beside it, got "
                              f"{', '.join(sorted(extra))}; change the architecture with model.preset instead")
        coerce(model["source"], str, "model.source")
        if model.get("dtype") is not None:
            coerce(model["dtype"], Literal["float32", "bfloat16"], "model.dtype")
        return
    for key, value in _flatten(model).items():
        if key == "preset":
            continue
        cls, parts = Config, key.split(".")
        for p in parts[:-1]:
            sub = cfg_mod._SUBCONFIGS.get(p) if cls is Config else None
            if sub is None:
                raise ConfigError(f"unknown field model.{key}")
            cls = sub
        hints = typing.get_type_hints(cls, vars(cfg_mod))
        if parts[-1] not in hints:
            near = difflib.get_close_matches(parts[-1], list(hints), n=1)
            hint = f" (did you mean {'.'.join(['model', *parts[:-1], near[0]])}?)" if near else ""
            raise ConfigError(f"unknown field model.{key}{hint}; allowed: {', '.join(hints)}")
        coerce(value, hints[parts[-1]], f"model.{key}")


def from_dict(d: dict[str, Any], source: str = "") -> Recipe:
    """Build and validate a `Recipe` from a nested dict (see `validate` for what is checked)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source or 'recipe'}: must be a YAML mapping with sections model, tokenizer, data, "
                          "train, optim, run")
    allowed = ["model", *SECTIONS]
    for k in d:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), allowed, n=1)
            raise ConfigError(f"unknown section {k!r}{f' (did you mean {near[0]}?)' if near else ''}; "
                              f"allowed: {', '.join(allowed)}")
    model = d.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("preset") or model.get("source"), str):
        raise ConfigError("model.preset is required: the name of a preset (e.g. gpt2-124m, llama-110m, teenygpt); "
                          "other model.* keys override its fields. Or model.source: a pretrained model "
                          "(a model folder, .gguf file or short name such as smollm2)")
    _check_model_types(model)
    sections = {name: _section(cls, d.get(name), name) for name, cls in SECTIONS.items()}
    return validate(Recipe(model=dict(model), source=source, **sections))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides, validate (files included) and return it."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"recipe {path} not found; pass --config with a YAML file such as "
                          "recipes/gpt2-124m/pretrain.yaml")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FormatError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(d).__name__}")
    return from_dict(apply_overrides(d, overrides or []), str(path))


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _check_train(t: TrainConfig) -> None:
    """The `train` section's values and ranges, and that its objective exists."""
    for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
        _need(getattr(t, name) >= 1, f"train.{name} must be a positive integer, got {getattr(t, name)}")
    for name in ("eval_every", "patience", "checkpoint_every", "keep_last", "threads"):
        _need(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    _need(t.max_epochs is None or t.max_epochs >= 1, f"train.max_epochs must be >= 1 or null, got {t.max_epochs}")
    _need(t.time_budget is None or t.time_budget > 0, f"train.time_budget must be > 0 seconds or null, "
          f"got {t.time_budget}")
    _need(t.schedule_clock == "steps" or t.time_budget is not None, "train.schedule_clock: time needs "
          "train.time_budget (seconds)")
    _need(t.peak_flops is None or t.peak_flops > 0, f"train.peak_flops must be > 0 or null, got {t.peak_flops}")
    _need(t.min_delta >= 0, f"train.min_delta must be >= 0, got {t.min_delta}")
    _need(t.seq_len is None or t.seq_len >= 1, f"train.seq_len must be a positive integer or null, got {t.seq_len}")
    _need(t.device in ("auto", "cpu") or t.device.startswith("cuda"), f"train.device must be 'auto', 'cpu' or "
          f"'cuda[:N]', got {t.device!r}")
    _need(t.global_batch is None or t.global_batch >= 1, f"train.global_batch must be a positive integer or null, "
          f"got {t.global_batch}")
    _need(t.dist_timeout > 0, f"train.dist_timeout must be > 0 seconds, got {t.dist_timeout}")
    from lmforge.train.objectives import OBJECTIVES

    _need(t.objective in OBJECTIVES, f"train.objective must be one of {list(OBJECTIVES)}, got {t.objective!r}")


def _check_optim_and_run(r: Recipe) -> None:
    """The `optim` and `run` sections' values and ranges."""
    o = r.optim
    _need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _need(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1 and optim.beta2 must be in [0, 1), got "
          f"{o.beta1}, {o.beta2}")
    _need(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")
    _need(r.run.samples >= 0 and r.run.sample_tokens >= 1, "run.samples must be >= 0 and run.sample_tokens >= 1")
    _need(bool(r.run.dir), "run.dir must name the run folder")


def _check_tokenizer(tk: TokenizerConfig) -> None:
    """A named tokenizer exists; a BPE to train has room for its bytes."""
    if tk.path is not None:
        p = Path(tk.path)
        _need(p.is_dir() and (p / "tokenizer.json").is_file() or p.is_file(),
              f"tokenizer.path {tk.path}: no such tokenizer folder (it must hold tokenizer.json); train one with "
              "`lmforge train-tokenizer`, or set tokenizer.path: null and tokenizer.kind: bpe | char")
    else:
        _need(tk.kind == "char" or tk.vocab_size >= 300, f"tokenizer.vocab_size must be >= 300 for byte-level BPE "
              f"(256 bytes + special tokens), got {tk.vocab_size}")


def _check_data(r: Recipe) -> None:
    """The data kind exists and fits the objective; its files exist and its limits fit the batch."""
    t, dt = r.train, r.data
    _need(dt.kind in DATA_KINDS, f"data.kind must be one of {list(DATA_KINDS)}, got {dt.kind!r}")
    _need((t.objective == "segment_lm") == (dt.kind == "stream"),
          "train.objective: segment_lm and data.kind: stream go together (segment recurrence reads consecutive "
          f"segments of the same streams), got objective {t.objective!r} with data.kind {dt.kind!r}")
    if dt.kind in ("tokens", "stream") and dt.path is not None:
        from lmforge.data import read_manifest

        _need(Path(dt.path).is_dir(), f"data.path {dt.path}: no such folder; prepare one with `lmforge prepare "
              "--out <folder>`, or set data.path: null to prepare data.source into the run folder")
        read_manifest(dt.path)  # FormatError naming the missing/truncated file
    if dt.kind == "passages":
        _need(dt.max_chars >= 8, f"data.max_chars must be >= 8, got {dt.max_chars}")
        _need(dt.max_sequences is None or dt.max_sequences >= t.batch_size, f"data.max_sequences must be >= "
              f"train.batch_size ({t.batch_size}) or null, got {dt.max_sequences}")
        _need(dt.path is None, "data.path is for kind: tokens; passages are built from data.source")
    elif t.max_epochs is not None:
        _need(dt.kind not in ("tokens", "stream"), "train.max_epochs needs data.kind: passages or instructions (token "
              "windows and streams have no epochs); bound the run with train.max_steps")
    if dt.kind in ("tokens", "passages", "stream") and dt.path is None:
        from lmforge.data.corpus import is_embedded

        _need(is_embedded(dt.source) or Path(dt.source).exists(),
              f"data.source {dt.source!r}: not an embedded corpus (shakespeare) and no such file or folder")
    if dt.kind == "instructions":
        from lmforge.data.instruct import check_source

        check_source(dt.source)
        _need(dt.val_source is None or Path(dt.val_source).is_file(), f"data.val_source {dt.val_source}: no such "
              "file; give a .jsonl file or null")
        _need(0 <= dt.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {dt.val_fraction}")


def _check_adapter(r: Recipe) -> None:
    """The `adapter` section's values and their fit with the data's packing."""
    a, dt = r.adapter, r.data
    _need(a.r >= 1 and a.alpha > 0 and 0 <= a.dropout < 1, f"adapter.r must be >= 1, adapter.alpha > 0 and "
          f"adapter.dropout in [0, 1), got r={a.r}, alpha={a.alpha}, dropout={a.dropout}")
    _need(a.target_r is None or 1 <= a.target_r <= a.r, f"adapter.target_r must be in [1, adapter.r={a.r}] or "
          f"null, got {a.target_r}")
    _need(a.num_virtual_tokens >= 1 and a.interval >= 1 and a.quant_blocksize >= 2 and a.quant_blocksize % 2 == 0,
          "adapter.num_virtual_tokens and adapter.interval must be >= 1, adapter.quant_blocksize even and >= 2")
    _need(not (dt.pack and a.method in ("prefix", "prompt")), f"data.pack: true cannot be used with adapter.method "
          f"{a.method} (virtual tokens would sit in front of a whole packed row); set data.pack: false")
    _need(a.method == "full" or bool(a.target_modules) or a.path is not None,
          "adapter.target_modules is empty; name the layers to adapt, e.g. [q_proj, v_proj]")


def _check_model(r: Recipe) -> None:
    """The model resolves (preset name, field names, shapes) with the vocabulary the run will have."""
    t, tk, dt = r.train, r.tokenizer, r.data
    cfg = r.model_config(vocab_size=29 if tk.path is None and tk.kind == "char" else None)
    seq = t.seq_len or cfg.block_size
    _need(seq <= cfg.block_size, f"train.seq_len ({seq}) exceeds the model's context model.block_size "
          f"({cfg.block_size})")
    if dt.kind == "passages":
        _need(dt.max_chars + 1 <= cfg.block_size, f"data.max_chars + 1 ({dt.max_chars + 1}, with BOS) exceeds "
              f"model.block_size ({cfg.block_size})")
    if "vocab_size" in _flatten(r.model) and tk.path is None and tk.kind == "bpe":
        _need(cfg.vocab_size >= tk.vocab_size, f"model.vocab_size ({cfg.vocab_size}) is smaller than "
              f"tokenizer.vocab_size ({tk.vocab_size}); drop model.vocab_size to follow the tokenizer")


def validate(r: Recipe) -> Recipe:
    """Check values, ranges, cross-field consistency and that named files exist. Returns `r`."""
    _check_train(r.train)
    _check_optim_and_run(r)
    _check_tokenizer(r.tokenizer)
    _check_data(r)
    _check_adapter(r)
    if r.model.get("source"):
        return r  # the architecture comes with the weights; checked when the run is built
    _check_model(r)
    return r


def dump_yaml(d: dict[str, Any]) -> str:
    """The recipe dict as YAML, sections in their usual order."""
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=False)
