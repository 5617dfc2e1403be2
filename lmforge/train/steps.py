"""The named steps of `Trainer.fit` (trainer.py): start or resume, check the stop conditions, one optimizer
update, its report, the periodic validation and checkpoint, and the end of the run.

`TrainingSteps` is a base class of `Trainer`: its methods use the trainer's model, data, optimizer and
settings. The order of their work is the loop's contract (bit-identical resume, fault-injection phases):
the global RNGs are set last in `_start`, and a step draws only through the data and the model.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.train import checkpoint as ckpt
from lmforge.train import distributed, faults
from lmforge.train.metrics import mfu_ratio, plot_curves, train_peak_flops
from lmforge.train.optim import lr_at


class TrainingDiverged(LMForgeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without saving the broken state."""


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


def seed_everything(seed: int) -> None:
    """Seed torch, Python and numpy global RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class _Fit:
    """What one `Trainer.fit()` carries from step to step."""

    resumed_from: int | None  # the step of the checkpoint this run resumed from
    elapsed0: float  # seconds trained before this process started (a resumed run's)
    peak: float | None  # the devices' FLOP/s for MFU (rank 0)
    pbar: Any  # the progress bar, or None
    t_start: float  # perf_counter when this process began training
    last_ckpt: int  # the step of the newest checkpoint (-1: none yet)
    params: list[torch.Tensor]  # every optimised parameter (for the gradient norm)
    stopped: str = "max_steps"
    elapsed: float = 0.0  # run.clock() at the last stop check (all ranks: rank 0's)
    train_loss: float | None = None
    tok_s: float = 0.0
    rate_tokens: int = 0
    rate_time: float = 0.0
    flops_per_tok: float | None = None

    def clock(self) -> float:
        """Seconds trained in all, this process's and those before it."""
        return self.elapsed0 + time.perf_counter() - self.t_start


class TrainingSteps:
    """The steps of `Trainer.fit`; `Trainer` sets every attribute used here."""

    def _start(self, resume: str | None) -> _Fit:
        """Resume (or start afresh), measure the peak FLOP/s, open the progress bar, then set every global RNG."""
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
        pbar = self._progress_bar() if cfg.progress and self.is_main else None
        self.model.train()
        run = _Fit(resumed_from=resumed_from, elapsed0=elapsed0, peak=peak, pbar=pbar,
                   t_start=time.perf_counter(), last_ckpt=self.step if start else -1,
                   params=[p for g in self.optimizer.param_groups for p in g["params"]])
        # Every global RNG is set last, right before the first step, on every rank: what ran since the process
        # started (building the model and data, the peak FLOP/s benchmark on rank 0 alone, ...) may have drawn
        # from them, and a checkpoint's RNG states must be the ones the step after it starts from.
        if start:
            ckpt.set_rng_state(self._saved_rng(start.state))
        else:
            seed_everything(cfg.seed)
        return run

    def _progress_bar(self):
        from tqdm.auto import tqdm

        total = self.cfg.max_steps
        if self.cfg.max_epochs is not None and getattr(self.data, "steps_per_epoch", None):
            total = min(total, self.cfg.max_epochs * self.data.steps_per_epoch)
        return tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _should_stop(self, run: _Fit) -> bool:
        """Update the run's clock; True (with `run.stopped` set) when a signal or a limit ends the run here."""
        cfg = self.cfg
        run.elapsed = run.clock()
        got_signal = bool(self._signal)
        if self.dist.world_size > 1:  # every rank stops at the same step: a signal on any, rank 0's clock
            flag, run.elapsed = distributed.all_sum(self.dist, [float(got_signal),
                                                                run.elapsed if self.is_main else 0.0])
            got_signal = flag > 0
        if got_signal:
            run.stopped = f"signal:{self._signal or 'SIGTERM'}"
        elif self.step >= cfg.max_steps:
            run.stopped = "max_steps"
        elif cfg.patience and self.bad_evals >= cfg.patience:  # an early-stopped run, resumed
            run.stopped = "early_stopping"
        elif cfg.max_epochs is not None and self.data.epoch is not None and self.data.epoch >= cfg.max_epochs:
            run.stopped = "max_epochs"
        elif cfg.time_budget is not None and run.elapsed >= cfg.time_budget:
            run.stopped = "time_budget"
        else:
            return False
        return True

    def _train_step(self, run: _Fit) -> tuple[float, float, int, float]:
        """One optimizer update over `grad_accum` micro-batches: (lr, gradient norm, tokens, seconds)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        sched_step = self.step
        if cfg.schedule_clock == "time" and cfg.time_budget:
            sched_step = max(self.step, int(run.elapsed / cfg.time_budget * cfg.max_steps))
        lr = lr_at(sched_step, self.optim_cfg, cfg.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum, n_tok = 0.0, 0
        for i in range(cfg.grad_accum):
            batch = self._to_device(self.data.next_batch())
            if run.flops_per_tok is None and hasattr(self.model, "estimate_flops"):
                run.flops_per_tok = self.model.estimate_flops(batch["input_ids"].shape[1])
            with distributed.grad_sync(self._wrapped, self.dist, i == cfg.grad_accum - 1), self._autocast():
                loss, _ = self.objective.loss(self._train_model, batch)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
            n_tok += self.objective.tokens(batch)
        faults.reached("step")
        if self.dist.world_size > 1:  # the global batch's loss and tokens
            loss_sum, n_tok = distributed.all_sum(self.dist, [loss_sum / self.dist.world_size, float(n_tok)])
            n_tok = int(n_tok)
        run.train_loss = train_loss = loss_sum / cfg.grad_accum
        # the norm is computed even without clipping: NaN gradients under a finite loss must stop
        # the run too, before they reach the weights (and a checkpoint)
        if self.optim_cfg.grad_clip > 0:
            gnorm = distributed.local_value(nn.utils.clip_grad_norm_(run.params, self.optim_cfg.grad_clip))
        else:
            gnorm = distributed.local_value(nn.utils.get_total_norm([p.grad for p in run.params
                                                                     if p.grad is not None]))
        if not math.isfinite(train_loss) or not math.isfinite(gnorm):
            self._diverged(train_loss, gnorm, run.pbar)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_tok
        return lr, gnorm, n_tok, time.perf_counter() - t0

    def _report_step(self, run: _Fit, lr: float, gnorm: float, n_tok: int, dt: float) -> None:
        """Update the token rate; log the train row (every log_every steps) and move the progress bar."""
        cfg = self.cfg
        run.rate_tokens, run.rate_time = run.rate_tokens + n_tok, run.rate_time + dt
        if run.rate_time > 2.0:  # a rate over the last couple of seconds, not one noisy step
            run.tok_s, run.rate_tokens, run.rate_time = run.rate_tokens / run.rate_time, 0, 0.0
        elif run.tok_s == 0.0:
            run.tok_s = n_tok / dt
        mfu = mfu_ratio(run.flops_per_tok, run.tok_s, run.peak)  # in [0, 1]
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            row = {"step": self.step, "split": "train", "loss": run.train_loss, "lr": lr,
                   "tokens": self.tokens_seen, "tok_per_s": round(run.tok_s, 1), "mfu": round(mfu, 4),
                   "grad_norm": gnorm}
            if self.data.epoch is not None:
                row["epoch"] = self.data.epoch
            self._log(row)
        if run.pbar is not None:
            run.pbar.update(1)
            budget = ""
            if cfg.time_budget is not None:  # tqdm's ETA counts steps; the budget may end the run first
                budget = f" budget left {max(cfg.time_budget - run.elapsed, 0) / 60:.1f} min"
            run.pbar.set_postfix_str(f"loss {run.train_loss:.4f} lr {lr:.2e} {run.tok_s:,.0f} tok/s MFU {mfu:.1%}"
                                     f"{budget}", refresh=False)

    def _maybe_evaluate(self, run: _Fit) -> bool:
        """Validate every eval_every steps; True when early stopping says stop."""
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            return self._validate(run.pbar, run.elapsed)
        return False

    def _maybe_checkpoint(self, run: _Fit) -> None:
        """Checkpoint every checkpoint_every steps."""
        if self.run_dir is not None and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint(run.clock())
            faults.reached("checkpoint_published")
            run.last_ckpt = self.step

    def _finish(self, run: _Fit) -> TrainResult:
        """The final validation, checkpoint, model folder and curves (as far as the way the run ended allows)."""
        cfg, stopped = self.cfg, run.stopped
        elapsed = run.clock()
        if stopped != "early_stopping" and (not cfg.eval_every or self.step % cfg.eval_every) and \
                not stopped.startswith("signal") and self.step != run.resumed_from:
            self._validate(run.pbar, elapsed)  # the run's final numbers
        if run.pbar is not None:
            run.pbar.close()
        if self.run_dir is not None:
            if run.last_ckpt != self.step:
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
        return TrainResult(step=self.step, stopped=stopped, train_loss=run.train_loss, val=self.last_val,
                           best_val=self.best_val, best_step=self.best_step, elapsed=elapsed,
                           tokens_per_s=run.tok_s, resumed_from=run.resumed_from)

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
