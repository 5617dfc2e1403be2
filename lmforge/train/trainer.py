"""The one training loop. Objectives and batch sources plug in; the loop itself is never copied.

Per optimizer step: `grad_accum` micro-batches through `objective.loss` (bf16 autocast optional),
a check that the loss is finite, gradient clipping, AdamW with the warmup + cosine schedule. Around it:
periodic validation with early stopping (the best model kept in `<run>/best`), atomic checkpoints that
resume bit-identically (weights, optimizer, every RNG, data position), SIGTERM/SIGINT handling,
`metrics.jsonl` + `curves.png`, and a progress bar with tokens/s, MFU and ETA.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lmforge.errors import ConfigError, LMForgeError
from lmforge.precision import train_dtype
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed, faults
from lmforge.train.allocator import allocator_for, apply_allocator
from lmforge.train.batches import BatchSource
from lmforge.train.metrics import MetricsLog, mfu_ratio, plot_curves, train_peak_flops
from lmforge.train.objectives import Objective
from lmforge.train.optim import OptimConfig, build_optimizer, lr_at


class TrainingDiverged(LMForgeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without saving the broken state."""


@dataclass
class TrainConfig:
    """Loop settings (the `train` section of a recipe)."""

    max_steps: int = 1000  # optimizer updates
    max_epochs: int | None = None  # for sources with epochs (padded sequences); None: no limit
    time_budget: float | None = None  # seconds of training; stops (with a checkpoint) when spent
    # "time": the lr schedule advances with max(step / max_steps, elapsed / time_budget), so a run cut by its
    # time budget still ends annealed (quickstart). Wall-clock dependent: not bit-reproducible on resume.
    schedule_clock: Literal["steps", "time"] = "steps"
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int | None = None  # tokens per window for token shards; None: the model's block_size
    eval_every: int = 100  # steps between validations; 0: only at the end
    eval_batches: int = 8  # validation batches (token shards); padded sequences use the whole split
    patience: int = 0  # early stopping: validations without improvement before stopping; 0: off
    min_delta: float = 0.0  # improvement smaller than this does not count
    checkpoint_every: int = 100  # steps between checkpoints; 0: only at the end (and on a signal)
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    log_every: int = 1  # steps between train rows in metrics.jsonl
    seed: int = 1337
    threads: int = 0  # torch intra-op threads; 0: torch's default. Resume with the same count for bit-identity
    # bfloat16: autocast matmuls, fp32 master weights (warns where the CPU only emulates bf16: many times slower);
    # auto: bfloat16 where the CPU computes it natively, as measured (lmforge.precision), else float32
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    compile: bool = False  # torch.compile the model for training steps
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time
    strategy: Literal["single", "ddp", "fsdp"] = "single"  # ddp / fsdp: launched by torchrun (distributed.py)
    global_batch: int | None = None  # sequences per optimizer step over all ranks; sets batch_size per rank
    dist_timeout: float = 600.0  # seconds a collective waits for a hung rank before the job fails
    keep_memory: bool = True  # CPU: false leaves malloc as it is (the same as allocator: system)
    # CPU malloc setting (allocator.py): keep (freed memory stays for the next step; ~10% faster), bounded
    # (blocks >= 2 MiB returned when freed: lower peak), system; auto: bounded for QLoRA (NF4 layers), else keep
    allocator: Literal["auto", "keep", "bounded", "system"] = "auto"
    device: str = "auto"  # auto: this rank's GPU when CUDA is there, else the CPU; or cpu, cuda, cuda:N
    peak_flops: float | None = None  # FLOP/s for MFU; None: measured once by a matmul benchmark and cached
    progress: bool = True  # tqdm progress bar
    objective: str = "causal_lm"  # a name in lmforge.train.objectives.OBJECTIVES
    loss_reduction: Literal["token_mean", "sequence_sum"] = "token_mean"
    mask_padding: bool = True  # ignore padding targets (pad after pad) in the loss
    objective_args: dict[str, Any] = field(default_factory=dict)  # the objective's own options (mask_prob, ...)


@dataclass
class TrainResult:
    """What a `fit()` did."""

    step: int
    stopped: str  # max_steps | max_epochs | time_budget | early_stopping | signal:SIGTERM | signal:SIGINT
    train_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)  # last validation metrics
    best_val: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0
    tokens_per_s: float = 0.0
    resumed_from: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when the run ended by itself; 128 + signal number when a signal stopped it (checkpoint saved)."""
        if self.stopped.startswith("signal:"):
            return 128 + int(getattr(signal, self.stopped.split(":")[1]))
        return 0


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches, dtype: str = "float32",
             device: str = "cpu") -> dict[str, float]:
    """`objective.summarize` of its stats summed over `batches`, in eval mode (no dropout); {} if no batches."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    dev = torch.device(device)
    try:
        for batch in batches:
            if dev.type != "cpu":
                batch = {k: v.to(dev) for k, v in batch.items()}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                _, stats = objective.loss(model, batch)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            faults.reached("validation")
    finally:
        model.train(was_training)
    return objective.summarize(totals) if totals else {}


def seed_everything(seed: int) -> None:
    """Seed torch, Python and numpy global RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class Trainer:
    """Train `model` on batches from `data` with `objective`.

    Args:
        model: a `DecoderLM` (or any module the objective can call); moved to the device `cfg.device` resolves
            to, and wrapped by `cfg.strategy` (DDP, or sharded in place by FSDP2: see distributed.py).
        objective: an `Objective`.
        data: a `BatchSource` (training batches, state, validation batches).
        cfg: loop settings; `optim`: optimizer and schedule.
        run_dir: where checkpoints, metrics.jsonl, curves.png, best/ and model/ go; None keeps nothing on disk.
        tokenizer: saved into every model folder the run writes.
    """

    def __init__(self, model: nn.Module, objective: Objective, data: BatchSource, cfg: TrainConfig,
                 optim: OptimConfig, run_dir: str | Path | None = None, tokenizer=None):
        self.cfg, self.optim_cfg = cfg, optim
        self.dist = distributed.init(cfg.strategy, cfg.device, cfg.dist_timeout)
        self.device = self.dist.device
        self.model = model.to(self.device)
        cfg.dtype = train_dtype(cfg.dtype, self.device)  # auto -> a concrete dtype, for the run and its readers
        self.objective, self.data, self.tokenizer = objective, data, tokenizer
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.keep_memory and self.device.type == "cpu":
            apply_allocator(allocator_for(cfg.allocator, model))
        if cfg.activation_checkpointing:
            if not hasattr(model, "activation_checkpointing"):
                raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} has no per-block "
                                  "checkpointing switch (a DecoderLM has)")
            model.activation_checkpointing = True
        if self.dist.world_size > 1:
            data.shard(self.dist.rank, self.dist.world_size)
        self._model_cls = type(model)  # before FSDP swaps the class: to rebuild a whole copy for saving
        self._wrapped = distributed.wrap_model(self.model, self.dist, cfg.dtype)
        # heads the objective trains with the model (reward, value): optimised, checkpointed and saved with it
        self.heads = nn.ModuleDict(objective.modules()).to(self.device)
        if len(self.heads) and self.dist.parallel:
            raise ConfigError(f"objective {objective.name!r} trains heads of its own, which are not yet sharded or "
                              "all-reduced across ranks: run it with train.strategy: single")
        # after sharding: FSDP's parameters are DTensors
        self.optimizer = build_optimizer(nn.ModuleList([self.model, self.heads]) if len(self.heads) else self.model,
                                         optim)
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.tokens_seen = 0
        self.last_val: dict[str, float] = {}
        self._signal: str | None = None
        self._train_model = torch.compile(self._wrapped) if cfg.compile else self._wrapped
        self.is_main = self.dist.is_main  # only rank 0 logs, writes metrics, curves and model folders
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.run_dir and self.is_main else None
        self._amp = cfg.dtype == "bfloat16"
        self._device_type = self.device.type
        # where a frozen base comes from ({"source", "dtype"}): set by the run builder for adapter runs, so
        # one-process checkpoints hold the trainable tensors and the base's fingerprint, not the base
        self.base_source: dict[str, Any] | None = None
        self._base_ref: dict[str, Any] | None = None

    # ---- pieces --------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self._amp)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._device_type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _llm(self):
        from lmforge.llm import LLM

        was_training = self.model.training
        llm = LLM(self.model, self.tokenizer)  # LLM() puts the model in eval mode
        self.model.train(was_training)
        return llm

    def _head_tensors(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()} if len(self.heads) \
            else None

    def save_model(self, folder: str | Path) -> Path:
        """Write the current weights (+ tokenizer, + the objective's heads) as a model folder `lmforge.load` reads
        (rank 0 writes; under FSDP every rank must call it, since the weights are gathered from all shards)."""
        if self.dist.strategy == "fsdp":
            from lmforge.llm import LLM

            sd = distributed.full_state_dict(self.model, self.dist)
            if self.is_main:
                whole = self._model_cls(self.model.config, init_weights=False)
                whole.load_state_dict(sd)
                LLM(whole, self.tokenizer).save(folder)
        elif self.is_main:
            # QLoRA: the adapters and the base's source, as checkpoints (and peft) write them; `lmforge.load`
            # quantizes the base to NF4 again. A whole folder would hold the NF4 base dequantized to fp32,
            # every layer at once while writing: 1,118 MB against the run's 816 MB (SmolLM2)
            qlora = self.base_source is not None and "nf4" in self.base_source
            path = self._llm().save(folder, base=self._base() if qlora else None)
            if self.run_dir is not None and Path(folder) == self.run_dir / "model":
                faults.reached("final_model")
            if len(self.heads):
                ckpt.save_heads(path, self._head_tensors())
        distributed.barrier(self.dist)
        return Path(folder)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over `data.eval_batches()`: loss, ppl, acc (and the objective's others).

        With several ranks each evaluates every world_size-th batch and the sums are all-reduced; every rank
        runs the same number of forwards (FSDP's all-gathers must pair up), padding with a repeat it ignores.
        """
        if self.dist.world_size == 1:
            return evaluate(self.model, self.objective, self.data.eval_batches(), self.cfg.dtype, str(self.device))
        batches = list(self.data.eval_batches())
        if not batches:
            return {}
        world, n = self.dist.world_size, len(batches)
        totals: dict[str, float] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for i in range(self.dist.rank, -(-n // world) * world, world):
                    batch = self._to_device(batches[min(i, n - 1)])
                    with self._autocast():
                        _, stats = self.objective.loss(self.model, batch)
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0.0) + (float(v) if i < n else 0.0)
                    faults.reached("validation")
        finally:
            self.model.train(was_training)
        keys = sorted(totals)
        return self.objective.summarize(dict(zip(keys, distributed.all_sum(self.dist, [totals[k] for k in keys]))))

    def _state(self, elapsed: float) -> dict[str, Any]:
        state = {"rng": ckpt.rng_state(), "data": self.data.state_dict(), "best_val": self.best_val,
                 "best_step": self.best_step, "bad_evals": self.bad_evals, "tokens_seen": self.tokens_seen,
                 "elapsed": elapsed, "threads": torch.get_num_threads(),
                 "schedule": {"lr": lr_at(self.step, self.optim_cfg, self.cfg.max_steps),
                              "max_steps": self.cfg.max_steps, **asdict(self.optim_cfg)}}
        if self.dist.world_size > 1:  # every rank's own RNGs (one GPU each; ranks may draw differently)
            import torch.distributed as dist

            ranks: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(ranks, state["rng"])
            state["rng_ranks"] = ranks
        return state

    def _saved_rng(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG states in a checkpoint's state (rank 0's where it was written at another world size)."""
        ranks = state.get("rng_ranks")
        return ranks[self.dist.rank] if ranks and len(ranks) == self.dist.world_size else state["rng"]

    def save_checkpoint(self, elapsed: float = 0.0) -> Path | None:
        """Checkpoint the current step into `<run>/checkpoints/step-N/` (atomic; prunes to keep_last)."""
        if self.run_dir is None:
            return None
        llm = None if self.dist.parallel else self._llm()
        state = self._state(elapsed)  # the RNG states the next step must start from, whatever saving does
        if self.dist.parallel:  # sharded, every rank writes its part (dist_checkpoint.py)
            from lmforge.train import dist_checkpoint

            path = dist_checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, state, self.dist,
                                        self._write_meta, keep_last=self.cfg.keep_last)
        else:
            path = ckpt.save_checkpoint(self.run_dir, self.step, llm, self.optimizer, state,
                                        keep_last=self.cfg.keep_last, heads=self._head_tensors(),
                                        objective_state=self.objective.state_dict(), base=self._base())
        # a run that goes on continues from exactly the captured states, as one resumed from this checkpoint does
        ckpt.set_rng_state(state["rng"])
        return path

    def _base(self) -> dict[str, Any] | None:
        """The frozen base's source and fingerprint (hashed once: it does not change while training)."""
        if self.base_source is None:
            return None
        if self._base_ref is None:
            self._base_ref = {**self.base_source, **ckpt.base_fingerprint(self.model)}
        return self._base_ref

    def _write_meta(self, folder: Path) -> None:
        """The model description beside a sharded checkpoint, so `lmforge.load` reads the folder as a model."""
        from lmforge.io import write_json

        cfg = self.model.config
        write_json(folder / "config.json", {"model_type": "lmforge", **cfg.to_dict()})
        write_json(folder / "lmforge.json", {"format_version": 1, "weights_layout": "dcp", "config": cfg.to_dict()})
        if self.tokenizer is not None:
            self.tokenizer.save(folder)

    def _restore(self, c: ckpt.Checkpoint) -> float:
        s = c.state
        if s.get("format") == "dcp":
            from lmforge.train import dist_checkpoint

            dist_checkpoint.load(c.path, self.model, self.optimizer)
        elif self.dist.strategy == "fsdp":
            raise ConfigError(f"{c.path} was written by a one-process run (train.strategy: single); resume it with "
                              "train.strategy: single or ddp, or start the fsdp run in a new run.dir")
        else:
            if s.get("base") is not None:  # adapter-only: this run rebuilt the base; it must be the same one
                ckpt.check_base(c.path, s["base"], self.model)
                ckpt.load_trainable(c.path, self.model)
            else:
                ckpt.load_model_weights(c.path, self.model)
            if len(self.heads):
                self.heads.load_state_dict(ckpt.load_heads(c.path))
            ckpt.load_optimizer_state(c.path, self.optimizer)
            self.objective.load_state_dict(ckpt.load_objective_state(c.path, self.device))
        self.data.load_state_dict(s["data"])  # the global RNGs (s["rng"]): set by fit, right before the loop
        self.step, self.best_val, self.best_step = int(s["step"]), s.get("best_val"), s.get("best_step")
        self.bad_evals, self.tokens_seen = int(s.get("bad_evals", 0)), int(s.get("tokens_seen", 0))
        if s.get("threads") and s["threads"] != torch.get_num_threads():
            print(f"warning: the checkpoint was written with {s['threads']} threads, this run has "
                  f"{torch.get_num_threads()}; results will not be bit-identical (set train.threads)",
                  file=sys.stderr)
        return float(s.get("elapsed", 0.0))

    def _own_rng(self):
        """A context in which drawing random numbers leaves the global RNGs (CPU, and this run's GPU) as they were."""
        cuda = self._device_type == "cuda"
        return torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda")

    def _on_signal(self, signum, _frame) -> None:
        self._signal = signal.Signals(signum).name
        # a second signal gets the default behaviour (atomic writes keep the saved checkpoints whole)
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _log(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(row)

    def _validate(self, pbar, elapsed: float) -> bool:
        """Run validation, log it, track the best; True when early stopping says stop."""
        val = self.evaluate()
        if not val:
            return False
        self.last_val = val
        self._log({"step": self.step, "split": "val", **val})
        improved = self.best_val is None or val["loss"] < self.best_val - self.cfg.min_delta
        if improved:
            self.best_val, self.best_step, self.bad_evals = val["loss"], self.step, 0
            if self.run_dir is not None and self.cfg.patience > 0:
                self.save_model(self.run_dir / "best")
        else:
            self.bad_evals += 1
        shown = " ".join(f"{k} {val[k]:.4f}" for k in ("ppl", "acc") if k in val)  # objectives report different ones
        msg = (f"step {self.step}: val loss {val['loss']:.4f} {shown}"
               f"{' (best)' if improved else f' (best {self.best_val:.4f} at step {self.best_step})'}")
        if self.is_main:
            (pbar.write if pbar is not None else print)(msg)
        if self.metrics is not None:
            plot_curves(self.metrics.rows(), self.run_dir / "curves.png", title=str(self.run_dir))
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, resume: str | None = None) -> TrainResult:
        """Train until max_steps / max_epochs / time_budget / early stopping / a signal.

        resume: None (fresh; refuses a run folder that already has checkpoints), "auto" (newest whole
        checkpoint, or fresh if none) or a checkpoint folder.
        """
        cfg = self.cfg
        if self.run_dir is not None:
            ckpt.check_resume(self.run_dir, resume)
            if self.is_main:
                ckpt.clean_stale_temps(self.run_dir)
        start = self._resolve_resume(resume)
        elapsed0 = 0.0
        if start:
            elapsed0 = self._restore(start)
            if self.metrics is not None:
                self.metrics.truncate_after(self.step)
            if self.is_main:
                print(f"resumed from {start.path} (step {self.step})", file=sys.stderr)
        elif self.metrics is not None:
            self.metrics.reset()
        resumed_from = self.step if start else None

        peak = None
        if self.is_main:  # MFU per device: the global rate over world_size devices
            with self._own_rng():  # the benchmark draws random matrices, as many as the machine's speed says
                peak = (cfg.peak_flops or train_peak_flops(cfg.dtype, str(self.device))) * self.dist.world_size
        flops_per_tok = None
        pbar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            total = cfg.max_steps
            if cfg.max_epochs is not None and getattr(self.data, "steps_per_epoch", None):
                total = min(total, cfg.max_epochs * self.data.steps_per_epoch)
            pbar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.model.train()
        t_start = time.perf_counter()
        stopped, train_loss, tok_s, last_ckpt = "max_steps", None, 0.0, self.step if start else -1
        rate_tokens, rate_time = 0, 0.0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Every global RNG is set last, right before the first step, on every rank: what ran since the process
        # started (building the model and data, the peak FLOP/s benchmark on rank 0 alone, ...) may have drawn
        # from them, and a checkpoint's RNG states must be the ones the step after it starts from (issue 28).
        if start:
            ckpt.set_rng_state(self._saved_rng(start.state))
        else:
            seed_everything(cfg.seed)

        with self._signals():
            while True:
                elapsed = elapsed0 + time.perf_counter() - t_start
                got_signal = bool(self._signal)
                if self.dist.world_size > 1:  # every rank stops at the same step: a signal on any, rank 0's clock
                    flag, elapsed = distributed.all_sum(self.dist, [float(got_signal),
                                                                    elapsed if self.is_main else 0.0])
                    got_signal = flag > 0
                if got_signal:
                    stopped = f"signal:{self._signal or 'SIGTERM'}"
                    break
                if self.step >= cfg.max_steps:
                    stopped = "max_steps"
                    break
                if cfg.patience and self.bad_evals >= cfg.patience:  # an early-stopped run, resumed
                    stopped = "early_stopping"
                    break
                if cfg.max_epochs is not None and self.data.epoch is not None and self.data.epoch >= cfg.max_epochs:
                    stopped = "max_epochs"
                    break
                if cfg.time_budget is not None and elapsed >= cfg.time_budget:
                    stopped = "time_budget"
                    break

                t0 = time.perf_counter()
                sched_step = self.step
                if cfg.schedule_clock == "time" and cfg.time_budget:
                    sched_step = max(self.step, int(elapsed / cfg.time_budget * cfg.max_steps))
                lr = lr_at(sched_step, self.optim_cfg, cfg.max_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss_sum, n_tok = 0.0, 0
                for i in range(cfg.grad_accum):
                    batch = self._to_device(self.data.next_batch())
                    if flops_per_tok is None and hasattr(self.model, "estimate_flops"):
                        flops_per_tok = self.model.estimate_flops(batch["input_ids"].shape[1])
                    with distributed.grad_sync(self._wrapped, self.dist, i == cfg.grad_accum - 1), self._autocast():
                        loss, _ = self.objective.loss(self._train_model, batch)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item()
                    n_tok += self.objective.tokens(batch)
                faults.reached("step")
                if self.dist.world_size > 1:  # the global batch's loss and tokens
                    loss_sum, n_tok = distributed.all_sum(self.dist, [loss_sum / self.dist.world_size, float(n_tok)])
                    n_tok = int(n_tok)
                train_loss = loss_sum / cfg.grad_accum
                # the norm is computed even without clipping: NaN gradients under a finite loss must stop
                # the run too, before they reach the weights (and a checkpoint)
                if self.optim_cfg.grad_clip > 0:
                    gnorm = distributed.local_value(nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip))
                else:
                    gnorm = distributed.local_value(nn.utils.get_total_norm([p.grad for p in params
                                                                             if p.grad is not None]))
                if not math.isfinite(train_loss) or not math.isfinite(gnorm):
                    self._diverged(train_loss, gnorm, pbar)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += n_tok

                dt = time.perf_counter() - t0
                rate_tokens, rate_time = rate_tokens + n_tok, rate_time + dt
                if rate_time > 2.0:  # a rate over the last couple of seconds, not one noisy step
                    tok_s, rate_tokens, rate_time = rate_tokens / rate_time, 0, 0.0
                elif tok_s == 0.0:
                    tok_s = n_tok / dt
                mfu = mfu_ratio(flops_per_tok, tok_s, peak)  # in [0, 1]
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    row = {"step": self.step, "split": "train", "loss": train_loss, "lr": lr,
                           "tokens": self.tokens_seen, "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 4),
                           "grad_norm": gnorm}
                    if self.data.epoch is not None:
                        row["epoch"] = self.data.epoch
                    self._log(row)
                if pbar is not None:
                    pbar.update(1)
                    budget = ""
                    if cfg.time_budget is not None:  # tqdm's ETA counts steps; the budget may end the run first
                        budget = f" budget left {max(cfg.time_budget - elapsed, 0) / 60:.1f} min"
                    pbar.set_postfix_str(f"loss {train_loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s MFU {mfu:.1%}"
                                         f"{budget}", refresh=False)

                stop_early = False
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    stop_early = self._validate(pbar, elapsed)
                if self.run_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(elapsed0 + time.perf_counter() - t_start)
                    faults.reached("checkpoint_published")
                    last_ckpt = self.step
                if stop_early:
                    stopped = "early_stopping"
                    break

        elapsed = elapsed0 + time.perf_counter() - t_start
        if stopped != "early_stopping" and (not cfg.eval_every or self.step % cfg.eval_every) and \
                not stopped.startswith("signal") and self.step != resumed_from:
            self._validate(pbar, elapsed)  # the run's final numbers
        if pbar is not None:
            pbar.close()
        if self.run_dir is not None:
            if last_ckpt != self.step:
                self.save_checkpoint(elapsed)
                faults.reached("checkpoint_published")
            if not stopped.startswith("signal"):
                self.save_model(self.run_dir / "model")
            if self.metrics is not None:
                plot_curves(self.metrics.rows(), self.run_dir / "curves.png", title=str(self.run_dir))
                self.metrics.close()
        if stopped.startswith("signal") and self.is_main:
            print(f"{stopped.split(':')[1]} received: saved checkpoint step-{self.step} in "
                  f"{self.run_dir / ckpt.CKPT_DIR if self.run_dir else '(no run folder)'}; continue with "
                  "--resume auto", file=sys.stderr)
        return TrainResult(step=self.step, stopped=stopped, train_loss=train_loss, val=self.last_val,
                           best_val=self.best_val, best_step=self.best_step, elapsed=elapsed,
                           tokens_per_s=tok_s, resumed_from=resumed_from)

    def _resolve_resume(self, resume: str | None) -> ckpt.Checkpoint | None:
        """The checkpoint to start from: rank 0 verifies and chooses, every rank takes its choice."""
        if self.run_dir is None:
            return None
        if self.dist.world_size == 1:
            return ckpt.resolve_resume(self.run_dir, resume)
        import torch.distributed as dist

        box = [ckpt.resolve_resume(self.run_dir, resume) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _diverged(self, loss: float, gnorm: float | None, pbar) -> None:
        if pbar is not None:
            pbar.close()
        self._log({"step": self.step + 1, "split": "event", "event": "non_finite",
                   "loss": str(loss), "grad_norm": str(gnorm)})
        if self.metrics is not None:
            self.metrics.close()
        last = ckpt.find_latest(self.run_dir) if self.run_dir else None
        where = f"the last good checkpoint is {last.path} (step {last.step}); " if last else "no checkpoint was saved; "
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {gnorm}"
        raise TrainingDiverged(
            f"non-finite {what} at step {self.step + 1}: training stopped without saving the broken state; {where}"
            "lower optim.lr, raise optim.warmup_steps, keep optim.grad_clip > 0 or use train.dtype=float32, then "
            "resume with --resume auto")
