"""A `Trainer`'s checkpoints: what a checkpoint holds besides the weights, writing one, and resuming from one.

`TrainerCheckpoints` is a base class of `Trainer` (trainer.py): its methods read and set the trainer's
model, optimizer, data position, early-stopping counters and RNG states.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.train import checkpoint as ckpt
from lmforge.train.optim import lr_at


class TrainerCheckpoints:
    """Checkpoint writing and resuming for `Trainer`, which sets every attribute used here."""

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
