"""Scale-out strategies for the one Trainer: `single`, `ddp` and `fsdp` (FSDP2), on PyTorch's own engine.

    torchrun --nproc_per_node 2 -m lmforge pretrain --config recipes/teenygpt.yaml --set train.strategy=ddp

The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
gloo on CPU, nccl on CUDA, each rank on `cuda:LOCAL_RANK` when there is a GPU. DDP replicates the
model and all-reduces gradients; FSDP2 (`fully_shard`, one unit per block plus the root) shards
parameters, gradients and optimizer state, with a mixed-precision policy (bf16 compute, fp32 reduce)
when `train.dtype: bfloat16`. Every rank runs the same loop; only rank 0 logs, writes metrics and
draws curves. Data is global: every rank draws the same global batch positions and keeps its own
slice of them, so the position saved in a checkpoint means the same thing at any world size.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError

STRATEGIES = ("single", "ddp", "fsdp")
_OWNED = False  # this module created the process group (so `finish` may end it)
_GROUPS = 0  # process groups this module has created in this process
LAUNCH_HINT = ("launch it with torchrun, e.g. `torchrun --nproc_per_node 2 -m lmforge pretrain --config "
               "<recipe> --set train.strategy={s}`, or set train.strategy: single for one process")


@dataclass
class DistEnv:
    """Where this process stands: strategy, rank, world size, and the device it trains on."""

    strategy: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes metrics, curves and model folders."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """A process group is in use (ddp or fsdp, any world size)."""
        return self.strategy != "single"


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": this rank's GPU (`cuda:LOCAL_RANK`) when CUDA is there, else the CPU; "cuda" gets the rank's index."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher speaking its protocol) set up this process's environment."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init(strategy: str = "single", device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """The process group for `strategy` (created once from torchrun's environment; reused after that).

    Raises ConfigError for ddp/fsdp without torchrun, and for `single` started as one of several ranks
    (each would train its own copy and write the same files).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "single":
        if world > 1:
            raise ConfigError(f"train.strategy: single was launched as one of {world} processes; set "
                              "train.strategy: ddp or fsdp to train together, or launch one process")
        return DistEnv("single", device=resolve_device(device))
    if not dist.is_available():
        raise ConfigError(f"train.strategy: {strategy} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized() and not launched_by_torchrun():
        raise ConfigError(f"train.strategy: {strategy} needs a process group, and none is set up: "
                          + LAUNCH_HINT.format(s=strategy))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # a lost peer fails gloo's collectives at once (closed socket); the timeout bounds a hung one
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        global _OWNED, _GROUPS
        _OWNED, _GROUPS = True, _GROUPS + 1
        atexit.register(shutdown)
    return DistEnv(strategy, dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown() -> None:
    """Destroy the process group if one exists (at exit, or after `finish`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a command that returned normally: wait for every rank to end too, then destroy the process group.

    Only for a group `init` created. The ranks meet through the launcher's key-value store, not a collective:
    once every rank has counted itself in, none has a gloo/nccl operation in flight, so no rank closes its
    connections while a peer still reads from them (rank 0 writes its report after the others are done).
    A rank that failed never counts itself in; torchrun then stops the waiting ones.
    """
    global _OWNED
    if not (_OWNED and dist.is_available() and dist.is_initialized()):
        return
    _OWNED = False
    if dist.get_world_size() > 1:
        store = dist.distributed_c10d._get_default_store()
        key = f"lmforge/finished/{_GROUPS}"  # every rank creates its groups in the same order
        store.add(key, 1)
        while store.add(key, 0) < dist.get_world_size():
            time.sleep(0.02)
    shutdown()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def config_hash(payload: Any) -> str:
    """sha256 of a JSON-ready recipe (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(env: DistEnv, payload: Any) -> None:
    """ConfigError on every rank when the ranks were given different recipes (compared by hash)."""
    if env.world_size == 1:
        return
    mine = config_hash(payload)
    hashes: list[str | None] = [None] * env.world_size
    dist.all_gather_object(hashes, mine)
    if len(set(hashes)) > 1:
        groups = {h: [r for r, x in enumerate(hashes) if x == h] for h in dict.fromkeys(hashes)}
        desc = "; ".join(f"ranks {rs}: {h[:12]}" for h, rs in groups.items())
        raise ConfigError(f"the ranks were launched with different recipes (config hash {desc}); every rank must "
                          "get the same --config and --set values")


def resolve_batch(train_cfg, world_size: int) -> int:
    """Global batch (sequences per optimizer step, all ranks) = micro-batch x grad_accum x world size.

    With `train.global_batch` set, the per-rank micro-batch (`train.batch_size`) is derived from it, so one
    recipe trains the same way on any number of processes; it must divide exactly (ConfigError otherwise).
    """
    ga = train_cfg.grad_accum
    gb = getattr(train_cfg, "global_batch", None)
    if gb is not None:
        per = world_size * ga
        if gb % per:
            raise ConfigError(f"train.global_batch ({gb}) is not divisible by world size {world_size} x "
                              f"train.grad_accum {ga} = {per}; choose a global batch that is a multiple of {per}, "
                              "or change --nproc_per_node / train.grad_accum")
        train_cfg.batch_size = gb // per
    return train_cfg.batch_size * ga * world_size


def setup_recipe(recipe, payload: Any) -> DistEnv:
    """For a command's run builder: process group, the same recipe on every rank, the global batch.

    `payload` is the recipe as given (JSON-ready), hashed across ranks before any rank does work.
    """
    t = recipe.train
    env = init(t.strategy, t.device, t.dist_timeout)
    check_same_config(env, payload)
    gb = resolve_batch(t, env.world_size)
    if env.is_main:
        print(f"strategy {env.strategy} on {env.world_size} process{'es' if env.world_size > 1 else ''} "
              f"({env.device}): global batch {gb} sequences = micro-batch {t.batch_size} x grad_accum "
              f"{t.grad_accum} x world size {env.world_size}", file=sys.stderr, flush=True)
    return env


@contextlib.contextmanager
def main_first(env: DistEnv):
    """Rank 0 runs the body first (builds the tokenizer, prepares data); the others follow and reuse it."""
    if env.world_size > 1 and not env.is_main:
        dist.barrier()
    yield
    if env.world_size > 1 and env.is_main:
        dist.barrier()


def barrier(env: DistEnv) -> None:
    """All ranks meet here (a no-op in one process)."""
    if env.world_size > 1:
        dist.barrier()


# ---- the model ---------------------------------------------------------------------------------

def wrap_model(model: nn.Module, env: DistEnv, dtype: str = "float32") -> nn.Module:
    """The module the training step calls: `model` itself (single), a DDP wrapper, or `model` sharded in
    place by FSDP2 (its blocks, then the root that keeps embeddings, tied LM head and final norm)."""
    if env.strategy == "single":
        return model
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradients as views of the all-reduce buckets: no copy in and out, one gradient-sized buffer less
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def grad_sync(train_model: nn.Module, env: DistEnv, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only on the last one."""
    if env.strategy == "ddp" and not sync:
        return train_model.no_sync()
    if env.strategy == "fsdp":
        train_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def local_value(x) -> float:
    """A float from a tensor that may be a DTensor (FSDP's gradient norm is one)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def all_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Elementwise sum over ranks (float64 on the CPU for gloo, on the device for nccl)."""
    if env.world_size == 1:
        return values
    dev = env.device if env.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank when it is True on any (stop decisions must be the same everywhere)."""
    if env.world_size == 1:
        return flag
    return all_sum(env, [1.0 if flag else 0.0])[0] > 0


def full_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the CPU on rank 0 (gathered from shards under FSDP; None elsewhere)."""
    if env.strategy != "fsdp":
        return model.state_dict() if env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if env.is_main else None
