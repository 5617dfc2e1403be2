"""The loader: a preset, a model folder, a .gguf file or a short name -> a model and its tokenizer.

`lmforge.load` wraps `load_model`'s result in an `LLM`; code below the facade (trainers, the adapter-only
base, `lmforge embed`) uses the model and tokenizer directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from lmforge.config import Config
from lmforge.errors import ConfigError, FormatError
from lmforge.interop import hf
from lmforge.models import DecoderLM, make_model
from lmforge.models.build import empty_model, no_init
from lmforge.models.decoder import tied_key
from lmforge.models.ngram import MODEL_TYPE as NGRAM_TYPE
from lmforge.models.ngram import NGramLM
from lmforge.presets import get_preset

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class Loaded(NamedTuple):
    """What `load_model` returns: the model (in eval mode), its tokenizer (None for a bare preset), and where it
    was read from (the "preset:<name>" source, or the folder or .gguf file a path or short name led to)."""

    model: nn.Module
    tokenizer: Any
    source: str


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_tokenizer(model: nn.Module, tok) -> None:
    """ConfigError when `tok` has more tokens than `model` has embeddings (None passes)."""
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer's vocabulary ({tok.vocab_size}) is larger than the model's "
                          f"({model.config.vocab_size}); use a matching tokenizer or a model with "
                          "vocab_size >= the tokenizer's")


def build(cfg: Config, state_dict: dict[str, torch.Tensor] | None, source: str,
          dtype: torch.dtype | None = None, device: str | torch.device = "cpu", assign: bool = False) -> DecoderLM:
    """A `DecoderLM` for `cfg` holding `state_dict`, checked tensor by tensor before anything loads.

    With `assign=True` the model takes the given tensors as its parameters instead of copying them (for
    loaders that own freshly read tensors: no second copy of the weights, no time spent initialising).
    """
    if state_dict is None:
        model = make_model(cfg, init_weights=True)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)
    with no_init():
        model = make_model(cfg, init_weights=False)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise FormatError(f"{source}: weights do not match the config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise FormatError(f"{source}: tensor {k!r} has shape {tuple(state_dict[k].shape)}, "
                              f"the config needs {tuple(v.shape)}")
    if not assign:
        model.load_state_dict(state_dict)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)
    # One floating dtype for all weights: the requested one, else the embedding's as stored.
    dtype = dtype or state_dict["tok_emb.weight"].dtype
    cast = {}
    for k, v in state_dict.items():
        want = dtype if v.is_floating_point() else v.dtype
        cast[k] = v.to(device=device, dtype=want).contiguous()  # no copy when already right
    model.load_state_dict(cast, assign=True)
    if cfg.tie_embeddings:  # assign gives each key its own Parameter: tie them again
        model.tie_weights()
    return model.to(device=device, dtype=dtype)  # the buffers; parameters are already there


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = [folder / "model.safetensors"]
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise FormatError(f"{index}: not a valid safetensors index ({e})") from e
        files = [folder / s for s in shards]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise FormatError(f"{folder}: missing weights file {f.name}")
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise FormatError(f"{f}: cannot read safetensors file ({e}); the file is truncated or corrupt") from e
    return out


def _folder_tokenizer(folder: Path):
    from lmforge.tokenizers import load_tokenizer

    return load_tokenizer(folder) if (folder / "tokenizer.json").exists() else None


def _load_folder(folder: Path, dtype, device, allow_pickle: bool) -> tuple[nn.Module, Any]:
    meta_path, cfg_path = folder / "lmforge.json", folder / "config.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        config_json = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    except ValueError as e:
        raise FormatError(f"{folder}: config file is not valid JSON ({e})") from e
    if config_json is not None and config_json.get("model_type") == NGRAM_TYPE:
        tok = _folder_tokenizer(folder)
        return _checked(NGramLM.load(folder), tok)
    if meta is not None:
        cfg = Config.from_dict(meta["config"])
        layout = meta.get("weights_layout", "native")
    elif config_json is not None:
        cfg, layout = hf.from_hf_config(config_json, str(cfg_path)), "hf"
    else:
        raise FormatError(f"{folder}: no config.json or lmforge.json; not a model folder")
    has_weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    if meta is not None and meta.get("base") and not has_weights:  # adapters only: the base from its source
        from lmforge.adapt.state import check_fingerprint

        loaded = _with_adapters(folder, load_base(folder, meta["base"], cfg, dtype, device))
        check_fingerprint(folder, meta["base"], loaded[0])
        return loaded
    if has_weights:
        tensors = _read_safetensors(folder)
    elif layout == "dcp":  # a ddp/fsdp run's sharded checkpoint
        from lmforge.interop.dcp import read_model_tensors

        tensors, layout = read_model_tensors(folder), "native"
    else:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if not pickles:
            raise FormatError(f"{folder}: no model.safetensors found")
        tensors = {}
        for p in pickles:
            tensors.update(_load_pickle(p, allow_pickle))
    if dtype is None and any(v.dtype == torch.bfloat16 for v in tensors.values()):
        from lmforge.precision import load_dtype  # bf16 as stored, except where this CPU only emulates it

        dtype = load_dtype(None, torch.bfloat16, device, what=f"{folder.name}: the weights")
    if meta is not None and meta.get("quantization"):
        from lmforge.quant.model import load_quantized_state, restore

        model = load_quantized_state(restore(empty_model(cfg), meta["quantization"]), tensors, dtype, device,
                                     str(folder))
        return _checked(model, _folder_tokenizer(folder))
    sd = hf.from_hf_state_dict(cfg, tensors, str(folder)) if layout == "hf" else dict(tensors)
    if layout != "hf" and tied_key(cfg):
        sd[tied_key(cfg)] = sd.get("tok_emb.weight")
    return _with_adapters(folder, build(cfg, sd, str(folder), dtype, device, assign=True))


def _checked(model: nn.Module, tok) -> tuple[nn.Module, Any]:
    """(model in eval mode, tok), after checking that the tokenizer fits the model's vocabulary."""
    model.eval()
    check_tokenizer(model, tok)
    return model, tok


def _with_adapters(folder: Path, model: nn.Module) -> tuple[nn.Module, Any]:
    """The folder's adapters (if any) put on `model`, with the folder's tokenizer."""
    if (folder / "adapter_config.json").is_file():  # a fine-tuned model saved as base + adapter
        from lmforge.adapt import load_adapter

        load_adapter(model, folder)
    elif (folder / "lmforge_adapter.json").is_file():  # base + lmforge-format adapters (bottleneck)
        from lmforge.adapt.bottleneck import load_native_adapter

        load_native_adapter(model, folder)
    return _checked(model, _folder_tokenizer(folder))


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise FormatError(f"{path}: refusing to read a pickle file ({path.suffix}): unpickling can run code. "
                          "Convert it to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust it; "
                          "it is then read with weights_only=True")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FormatError(f"{path}: cannot load with weights_only=True ({e})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError(f"{path}: expected a dict of tensors")
    return obj


def load_base(folder: Path, ref: dict, cfg: Config, dtype, device) -> nn.Module:
    """The base an adapter-only folder names (`lmforge.json` `base.source`; NF4 again for QLoRA), checked
    against the folder's config. `check_fingerprint` compares it, once adapted, with the recorded one."""
    src = ref.get("source")
    if not src:
        raise FormatError(f"{folder}: lmforge.json's base names no source and the folder has no model.safetensors")
    nf4 = ref.get("nf4")  # QLoRA: the adapters were trained on the NF4-quantized base
    try:
        model = load_model(src, dtype=dtype or ref.get("dtype"), device=device, dequantize=not nf4).model
    except FormatError as e:
        raise FormatError(f"{folder}: holds adapters only; its base {src!r} cannot be loaded ({e}). Put the base "
                          "back where it was, or load a full model folder") from None
    theirs, ours = model.config.to_dict(), cfg.to_dict()
    diff = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k) and k != "name")
    if diff:
        raise FormatError(f"{folder}: holds adapters only, and its base {src!r} is now a different model "
                          f"(config differs in {', '.join(diff[:5])}); load it with the base it was trained on")
    if nf4:
        from lmforge.adapt.qlora import quantize_base

        quantize_base(model, blocksize=int(nf4["blocksize"]), double_quant=bool(nf4["double_quant"]))
    return model


def _load_path(src: str, dt: torch.dtype | None, device: str, allow_pickle: bool,
               dequantize: bool) -> Loaded:
    """A model folder, a .gguf file, or a short name resolved to one."""
    path = Path(src).expanduser()
    if not path.exists():
        from lmforge.interop import registry

        resolved = registry.resolve(src)
        if resolved is None:
            raise FormatError(f"{src}: no such file or folder, and not a preset (use 'preset:<name>') "
                              f"or a known short name ({', '.join(registry.SHORT_NAMES)})")
        path = resolved
    if path.is_dir():
        return Loaded(*_load_folder(path, dt, device, allow_pickle), str(path))
    if path.suffix == ".gguf":
        from lmforge.interop.gguf import load_gguf

        model, tok = load_gguf(path, dtype=dt, device=device, dequantize=dequantize)
        return Loaded(*_checked(model, tok), str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        raise FormatError(f"{path}: a bare pickle file has no config; put it in a model folder with "
                          "config.json (pickles also need allow_pickle=True)")
    if path.name == "tokenizer.json":
        raise FormatError(f"{path}: this is a tokenizer, not a model")
    raise FormatError(f"{path}: unknown model format; expected a model folder, a .gguf file or 'preset:<name>'")


def load_model(source: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
               tokenizer: str | os.PathLike | None = None, allow_pickle: bool = False,
               dequantize: bool = False) -> Loaded:
    """(model, tokenizer, source) from a preset, a model folder, a .gguf file or a short name.

    The arguments are `lmforge.load`'s, which wraps the result in an `LLM`. The model is in eval mode, and
    its tokenizer (the `tokenizer` given, else its own; None for a bare preset) fits its vocabulary.
    """
    dt = resolve_dtype(dtype)
    src = str(source)
    if dt == torch.bfloat16:  # kept as asked; a one-line warning where this CPU only emulates bf16
        from lmforge.precision import load_dtype

        load_dtype(dt, dt, device, what=f"{src}: dtype")
    if src.startswith("preset:"):
        cfg = get_preset(src.removeprefix("preset:"))
        tok = None
        if cfg.name == "teenygpt" or cfg.name == "tiny-teenygpt":
            from lmforge.tokenizers import CharTokenizer

            tok = CharTokenizer()
        loaded = Loaded(*_checked(build(cfg, None, src, dt, device), tok), src)
    else:
        loaded = _load_path(src, dt, device, allow_pickle, dequantize)
    if tokenizer is not None:
        from lmforge.tokenizers import load_tokenizer

        tok = load_tokenizer(tokenizer)
        check_tokenizer(loaded.model, tok)
        loaded = loaded._replace(tokenizer=tok)
    return loaded
