"""The one training loop. Objectives and batch sources plug in; the loop itself is never copied.

Per optimizer step: `grad_accum` micro-batches through `objective.loss` (bf16 autocast optional),
a check that the loss is finite, gradient clipping, AdamW with the warmup + cosine schedule. Around it:
periodic validation with early stopping (the best model kept in `<run>/best`), atomic checkpoints that
resume bit-identically (weights, optimizer, every RNG, data position), SIGTERM/SIGINT handling,
`metrics.jsonl` + `curves.png`, and a progress bar with tokens/s, MFU and ETA.

`Trainer.fit` is a short loop over named steps (steps.py); writing checkpoints and resuming from them is in
trainer_checkpoints.py. Both are base classes of `Trainer`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.precision import train_dtype
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed, faults
from lmforge.train.allocator import allocator_for, apply_allocator
from lmforge.train.batches import BatchSource
from lmforge.train.metrics import MetricsLog, plot_curves
from lmforge.train.objectives import Objective
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.steps import TrainingSteps, TrainResult
from lmforge.train.trainer_checkpoints import TrainerCheckpoints


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


class Trainer(TrainingSteps, TrainerCheckpoints):
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
        run = self._start(resume)
        with self._signals():
            while not self._should_stop(run):
                lr, gnorm, n_tok, dt = self._train_step(run)
                self._report_step(run, lr, gnorm, n_tok, dt)
                stop_early = self._maybe_evaluate(run)
                self._maybe_checkpoint(run)
                if stop_early:
                    run.stopped = "early_stopping"
                    break
        return self._finish(run)
