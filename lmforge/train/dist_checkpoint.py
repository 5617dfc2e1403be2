"""Sharded checkpoints for ddp/fsdp runs, through `torch.distributed.checkpoint` (DCP).

`checkpoints/step-N/` holds DCP's files (`__R_0.distcp`, written by every rank in parallel, and
`.metadata`, written by rank 0 once all ranks reported), `lmforge.json` + `config.json` + the tokenizer
(so `lmforge.load` / `lmforge convert` read the folder as a model), and `state.json` last. All of it is
built in `.step-N.tmp-dcp/` and renamed into place by rank 0 after every rank's part is written,
fsync'ed and hashed, so `step-N/` exists whole or not at all. state.json lists the sha256 of every file,
each rank's shard included: a checkpoint that later loses a shard fails `checkpoint.verify_checkpoint`
and `--resume auto` falls back to the previous whole one.

Weights and optimizer state are saved by fully qualified parameter name (DCP's state-dict helpers),
not by rank, so a checkpoint resumes at any world size and under any strategy, `single` included.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lmforge.io import publish_dir, write_json
from lmforge.train import checkpoint as ckpt
from lmforge.train import faults
from lmforge.train.distributed import DistEnv

FORMAT = "dcp"


def _hash_own_files(folder: Path, rank: int) -> dict[str, str]:
    out = {}
    for p in sorted(folder.glob(f"__{rank}_*.distcp")):
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        out[p.name] = ckpt._sha256(p)
    return out


def _gather(env: DistEnv, obj: Any) -> list[Any]:
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], env: DistEnv, write_meta, keep_last: int = 3) -> Path:
    """Write `checkpoints/step-<step>/` from every rank (collective), whole or not at all.

    write_meta(folder) writes the model description (config, tokenizer) into the folder on rank 0.
    """
    target = ckpt.checkpoint_dir(run_dir, step)
    tmp = target.parent / f".{target.name}.tmp-dcp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(env)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    shards = {}
    for part in _gather(env, _hash_own_files(tmp, env.rank)):  # each rank hashes its own shard, in parallel
        shards.update(part)
    if env.is_main:
        referenced = {s.relative_path for s in dcp.FileSystemReader(str(tmp)).read_metadata().storage_data.values()}
        lost = referenced - set(shards)
        if lost:  # a rank's file is not where rank 0 reads: run.dir must be one shared folder for all nodes
            raise RuntimeError(f"checkpoint {target}: shards {sorted(lost)} are not visible from rank 0; put run.dir "
                               "on a filesystem every node shares")
        write_meta(tmp)
        files = {name: ckpt._sha256(tmp / name) for name in sorted(os.listdir(tmp)) if (tmp / name).is_file()}
        files.update(shards)
        faults.reached("checkpoint_write")
        write_json(tmp / ckpt.STATE_FILE, {**state, "step": step, "format_version": ckpt.FORMAT_VERSION,
                                           "format": FORMAT, "world_size": env.world_size,
                                           "strategy": env.strategy, "files": files, "complete": True})
        publish_dir(tmp, target)
        if keep_last > 0:
            for _, stale in ckpt.list_checkpoints(run_dir)[keep_last:]:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier(env)
    return target


def load(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load weights and optimizer state in place: sharded, replicated or plain, at any world size."""
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # a one-process resume has no process group, by intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()
