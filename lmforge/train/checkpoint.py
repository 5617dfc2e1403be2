"""Run checkpoints: `<run>/checkpoints/step-N/` = model folder + optimizer.pt + state.json, written atomically.

An adapter run whose frozen base comes from a source (`model.source`: a folder, .gguf file or short name)
writes the adapter-only variant: the model folder without its base weights (`lmforge.json` names the
base's source instead, so `lmforge.load` rebuilds it from there), plus `trainable.safetensors` holding
every tensor that training changes (trainable parameters and adapter buffers, under `state_dict` keys).
`state.json`'s `base` holds a fingerprint of the frozen tensors (a hash of their names, shapes, dtypes
and bytes); a resume rebuilds the base from its source and refuses one whose fingerprint differs.

A checkpoint is built in a temporary folder beside its final name, fsync'ed, and renamed into place
(`lmforge.io.atomic_dir`), so `step-N/` either exists whole or not at all, and older checkpoints are
pruned only after the new one is in place. `state.json` is written last and lists the sha256 of every
other file, so a checkpoint damaged later (truncated copy, bad disk) is recognised and skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.adapt.state import base_fingerprint, split_state, trainable_state
from lmforge.errors import ConfigError, FormatError
from lmforge.io import atomic_dir, write_json
from lmforge.train import faults

CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"
OPTIM_FILE = "optimizer.pt"
TRAINABLE_FILE = "trainable.safetensors"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


# ---- RNG state <-> JSON ------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step can touch (torch CPU drives dropout; CUDA if present)."""
    np_state = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured."""
    torch.set_rng_state(_unb64(state["torch"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- save / find / load ------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """`<run_dir>/checkpoints/step-<step>`."""
    return Path(run_dir) / CKPT_DIR / f"step-{step}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder, newest first (whole or not)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


HEADS_FILE = "heads.safetensors"
OBJECTIVE_FILE = "objective.pt"  # tensors the objective carries between batches (Transformer-XL memory)


def save_heads(folder: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an objective's head weights (reward / value heads) into a model folder, atomically."""
    from safetensors.torch import save_file

    path = Path(folder) / HEADS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def load_heads(folder: str | Path) -> dict[str, torch.Tensor]:
    """The head weights `save_heads` wrote; FormatError when the folder has none."""
    from safetensors.torch import load_file

    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        raise FormatError(f"{folder}: no {HEADS_FILE}; this model folder holds no reward/value head (train one "
                          "with `lmforge align --method reward`)")
    return load_file(str(path))


# ---- adapter-only checkpoints: what trains, and a fingerprint of what does not -------------------

def check_base(folder: Path, saved: dict[str, Any], model: torch.nn.Module) -> None:
    """ConfigError unless `model`'s frozen tensors are the base the adapter-only checkpoint was trained on."""
    ours = base_fingerprint(model)
    if ours["fingerprint"] == saved.get("fingerprint"):
        return
    what = (f"{saved.get('tensors')} frozen tensors / {saved.get('elements'):,} values there, {ours['tensors']} / "
            f"{ours['elements']:,} here" if (saved.get("tensors"), saved.get("elements")) !=
            (ours["tensors"], ours["elements"]) else "same shapes, different values")
    raise ConfigError(f"{folder}: this checkpoint's adapters were trained on another base model: its base "
                      f"{saved.get('source')!r} had fingerprint {saved.get('fingerprint')}, this run's base has "
                      f"{ours['fingerprint']} ({what}). Resume with the base it was trained on (the same "
                      "model.source, unchanged), or start a new run.dir")


def load_trainable(folder: Path, model: torch.nn.Module) -> None:
    """Copy an adapter-only checkpoint's `trainable.safetensors` into `model` in place, exactly."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / TRAINABLE_FILE))
    ours = model.state_dict()
    live = set(split_state(model)[0])
    if set(saved) != live:
        extra, missing = sorted(set(saved) - live), sorted(live - set(saved))
        raise FormatError(f"{folder}: its trainable tensors do not fit this run's model (not in the model: "
                          f"{extra[:3]}, not in the checkpoint: {missing[:3]}); the checkpoint is of another "
                          "adapter setup")
    with torch.no_grad():
        for k, v in saved.items():
            ours[k].copy_(v)


def save_checkpoint(run_dir: str | Path, step: int, llm, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int = 3, heads: dict[str, torch.Tensor] | None = None,
                    objective_state: dict[str, torch.Tensor] | None = None,
                    base: dict[str, Any] | None = None) -> Path:
    """Write `checkpoints/step-<step>/` atomically, then prune all but the newest `keep_last` (0 keeps all).

    `llm` is an `LLM` (model + tokenizer) saved as a model folder; `state` is JSON-ready run state
    (step, RNGs, data position, ...), to which the file checksums and a completion marker are added;
    `objective_state` the tensors the objective carries between batches (`objective.pt`, when any).
    `base` (the frozen base's source and fingerprint) writes the adapter-only variant: no base weights,
    `trainable.safetensors` instead. The model's train/eval mode is left as it was.
    """
    from safetensors.torch import save_file

    target = checkpoint_dir(run_dir, step)
    with atomic_dir(target) as tmp:
        if base is None:
            llm.save(tmp)
        else:
            llm.save(tmp, base=base)
            save_file(trainable_state(llm.model), str(tmp / TRAINABLE_FILE), metadata={"format": "pt"})
            state = {**state, "base": base}
        if heads:
            save_heads(tmp, heads)
        if objective_state:
            torch.save(objective_state, tmp / OBJECTIVE_FILE)
        torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        faults.reached("checkpoint_write")
        # state.json last: its presence with matching checksums is what "whole" means
        write_json(tmp / STATE_FILE, {**state, "step": step, "format_version": FORMAT_VERSION, "files": files,
                                      "complete": True})
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The checkpoint's state.json if the checkpoint is whole; FormatError saying what is wrong otherwise."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {STATE_FILE} (incomplete checkpoint)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e}); truncated or corrupt") from None
    if not isinstance(state, dict) or state.get("complete") is not True or not isinstance(state.get("files"), dict):
        raise FormatError(f"{path}: no completion marker; the checkpoint was not finished")
    for name, digest in state["files"].items():
        f = folder / name
        if not f.is_file():
            raise FormatError(f"{folder}: {name} is missing")
        if _sha256(f) != digest:
            raise FormatError(f"{f}: checksum mismatch (truncated or corrupt)")
    return state


@dataclass
class Checkpoint:
    """A verified checkpoint folder and its state."""

    path: Path
    step: int
    state: dict[str, Any]


def find_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest whole checkpoint; damaged newer ones are skipped with a warning naming the problem."""
    for step, folder in list_checkpoints(run_dir):
        try:
            state = verify_checkpoint(folder)
        except FormatError as e:
            warnings.warn(f"skipping checkpoint {folder.name}: {e}", stacklevel=2)
            continue
        return Checkpoint(folder, step, state)
    return None


FRESH = (None, "", "none", "never")  # values of `resume` that mean "start a new run"


def check_resume(run_dir: str | Path, resume: str | None) -> None:
    """Refuse, before any work, a fresh start in a run folder that already has checkpoints (it would mix
    two runs) and a `resume` that is neither "auto" nor a folder."""
    if resume in FRESH:
        if list_checkpoints(run_dir):
            raise ConfigError(f"run folder {run_dir} already has checkpoints; pass --resume auto to continue it, "
                              "or set run.dir to a new folder")
    elif resume != "auto" and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: not 'auto', 'none' or a checkpoint folder")


def resolve_resume(run_dir: str | Path, resume: str | None) -> Checkpoint | None:
    """`resume`: None/"none" (start fresh), "auto" (newest whole checkpoint, if any) or a checkpoint folder."""
    if resume in FRESH:
        return None
    if resume == "auto":
        return find_latest(run_dir)
    folder = Path(resume)
    if not folder.is_dir():
        raise FormatError(f"--resume {resume}: no such checkpoint folder; use 'auto' or a checkpoints/step-N folder")
    state = verify_checkpoint(folder)
    return Checkpoint(folder, int(state["step"]), state)


def load_objective_state(folder: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The objective's carried tensors saved in a checkpoint ({} when it saved none)."""
    path = Path(folder) / OBJECTIVE_FILE
    return torch.load(path, map_location=device, weights_only=True) if path.is_file() else {}


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Load optimizer.pt (tensors and plain containers only: `weights_only=True`)."""
    sd = torch.load(folder / OPTIM_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(sd)


def load_model_weights(folder: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's weights into `model` in place (same config), exactly.

    A frozen quantized layer of `model` (a QLoRA base) is left as it is: the checkpoint holds its
    dequantized weights, which the run rebuilt identically from its source.
    """
    from lmforge.llm import load

    saved = load(folder).model
    with torch.no_grad():
        ours = model.state_dict()
        for k, v in saved.state_dict().items():
            if k not in ours:
                parent = k.rpartition(".")[0]
                if callable(getattr(model.get_submodule(parent), "dequantize", None)):
                    continue
                raise FormatError(f"{folder}: tensor {k} has no place in this run's model; the checkpoint is of "
                                  "another model or adapter setup")
            ours[k].copy_(v)


def clean_stale_temps(run_dir: str | Path) -> None:
    """Remove temporary folders a killed run left beside its checkpoints (never whole checkpoints)."""
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
