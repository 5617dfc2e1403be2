"""Scale-out benchmark: the one Trainer on 1 process vs 2 processes (DDP, FSDP2), 1 thread each, through torchrun.

Each case is a separate job: `single` runs one plain process, `ddp`/`fsdp` run `torchrun --nproc_per_node 2`.
Every process trains with `lmforge.train.Trainer` (the real loop: forward, backward, all-reduce or
reduce-scatter, clipping, AdamW) on random token windows, at the same GLOBAL batch, so 2 processes do the
same work per step as one. Per case, one JSON line:

  tok_s            global training tokens/s over the measured steps (after warm-up steps)
  speedup          tok_s / tok_s of the 1-process case of the same model and checkpointing setting
  efficiency       speedup / processes (1.0 = perfect scaling)
  param_optim_mb   parameters + optimizer state held by one rank (local shards under FSDP), MiB
  peak_rss_mb      the largest peak resident memory of any rank (weights, activations, gloo buffers...)
  others_cores     CPU that other processes on the machine used during the case (0 = quiet machine)

Cases: {teeny,gpt2s}-{single,ddp,fsdp}[-ac] (teenyGPT's 1.1M shape; GPT-2 124M's shape; -ac: activation
checkpointing) and teeny-single-compile (torch.compile: compile time and steady-state tokens/s).

    flock /tmp/lmforge-heavy.lock .venv/bin/python bench/scale.py            # all cases (~10 min)
    .venv/bin/python bench/scale.py --cases teeny --steps 5                    # the small model only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

try:  # `python -m bench.scale` from the repo root, or `python bench/scale.py`
    from bench import common
except ImportError:  # pragma: no cover
    import common

MODELS = {  # preset, model overrides, global batch, sequence length
    "teeny": ("teenygpt", {}, 32, 150),
    "gpt2s": ("gpt2-124m", {}, 4, 256),
}
STRATEGIES = ("single", "ddp", "fsdp")
CASES = [f"{m}-{s}{ac}" for m in MODELS for ac in ("", "-ac") for s in STRATEGIES] + ["teeny-single-compile"]


def _local_mb(tensors) -> float:
    n = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        n += t.numel() * t.element_size()
    return n / common.MB


def worker(case: str, warmup: int, steps: int) -> None:
    """One rank of a case (run by torchrun, or alone for `single`): train, time, report from rank 0."""
    import resource

    import torch.distributed as dist

    from lmforge.models import DecoderLM
    from lmforge.presets import get_preset
    from lmforge.train import CausalLM, OptimConfig, TokenWindows, TrainConfig, Trainer
    from lmforge.train.distributed import resolve_batch

    name, strategy, *flags = case.split("-")
    preset, over, global_batch, seq = MODELS[name]
    torch.manual_seed(0)
    cfg = get_preset(preset).replace(**over)
    model = DecoderLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (200_000,), generator=torch.Generator().manual_seed(1)).numpy()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tc = TrainConfig(strategy=strategy, global_batch=global_batch, seq_len=seq, max_steps=warmup, threads=1,
                     eval_every=0, checkpoint_every=0, progress=False, peak_flops=1e11, dist_timeout=300,
                     activation_checkpointing="ac" in flags, compile="compile" in flags)
    resolve_batch(tc, world)  # per-rank micro-batch = global batch / world size
    data = TokenWindows(tokens, tc.batch_size, seq, seed=0)
    trainer = Trainer(model, CausalLM(), data, tc, OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    t0 = time.perf_counter()
    trainer.fit()  # warm-up steps (and compilation)
    warm_s = time.perf_counter() - t0
    trainer.cfg.max_steps = warmup + steps
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    params = list(trainer.model.parameters())
    states = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    rec = {"param_optim_mb": _local_mb(params) + _local_mb(states),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": wall}
    recs = [rec]
    if dist.is_initialized():
        recs = [None] * world
        dist.all_gather_object(recs, rec)
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        wall = max(r["wall_s"] for r in recs)
        print("RESULT " + json.dumps({
            "tok_s": steps * global_batch * seq / wall, "step_s": wall / steps, "warmup_s": warm_s,
            "param_optim_mb": max(r["param_optim_mb"] for r in recs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
            "params_m": model.num_params() / 1e6}), flush=True)


def run_case(case: str, warmup: int, steps: int, timeout: float) -> dict:
    """Launch a case's processes and collect the result line."""
    name, strategy, *flags = case.split("-")
    procs = 1 if strategy == "single" else 2
    script = [str(Path(__file__).resolve()), "--worker", case, "--warmup", str(warmup), "--steps", str(steps)]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with common.Contention() as busy:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        return {"case": case, "error": (r.stderr or r.stdout)[-1500:]}
    return {"case": case, "model": name, "strategy": strategy, "processes": procs, "threads_per_process": 1,
            "activation_checkpointing": "ac" in flags, "compile": "compile" in flags,
            "global_batch": MODELS[name][2], "seq_len": MODELS[name][3], **json.loads(lines[-1][7:]),
            "others_cores": busy.cores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=None, help=f"comma-separated, prefixes allowed; available: {', '.join(CASES)}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default: 20 teeny, 4 gpt2s)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.warmup, args.steps or (20 if args.worker.startswith("teeny") else 4))
        return
    cases = common.parse_cases(args.cases, CASES, CASES)
    base: dict[tuple[str, bool], float] = {}
    for case in cases:
        common.note(f"[scale] {case} ...")
        steps = args.steps or (20 if case.startswith("teeny") else 4)
        rec = run_case(case, args.warmup, steps, args.timeout)
        if "tok_s" in rec:
            key = (rec["model"], rec["activation_checkpointing"])
            if rec["strategy"] == "single" and not rec["compile"]:
                base[key] = rec["tok_s"]
            if key in base:
                rec["speedup"] = rec["tok_s"] / base[key]
                rec["efficiency"] = rec["speedup"] / rec["processes"]
        rec["loadavg_1m"] = os.getloadavg()[0]
        common.emit(rec)


if __name__ == "__main__":
    main()
