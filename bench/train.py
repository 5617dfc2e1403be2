"""Training-step benchmark: lmforge's `DecoderLM` against the `transformers` model, side by side.

One step is what `lmforge.train` does per optimizer step, written out here so the benchmark does not depend
on the trainer: forward, cross-entropy on fp32 logits, backward, gradient clipping to norm 1, AdamW step
(fused kernel, as the trainer's default), zero grads. Both sides hold identical weights and run the same
loss code, the same optimizer settings (lr 3e-4, betas 0.9/0.95, weight decay 0.1 on matrices only), the
same batch and threads. Each side runs in a process of its own, set up as its library sets up a training
process: lmforge's applies the trainer's malloc setting (`lmforge/train/allocator.py`: freed memory is kept
for the next step instead of being faulted in afresh; `--no-keep-memory` leaves it out), transformers' is a
plain Python process. The parent runs the sides' steps in turn so that load from other processes hits both
alike, and each step's minor page faults are counted. Cases:

  {gpt2,llama}-fp32       fp32 weights and math (GPT-2 124M shape; llama2.c stories110M shape)
  {gpt2,llama}-bf16       fp32 master weights, forward under torch.autocast("cpu", dtype=torch.bfloat16)
  {gpt2,llama}-bf16pure   weights, grads and optimizer state in bf16 (not in the default set)

MFU = tokens/s x model FLOPs per token (`DecoderLM.estimate_flops`, 6N + attention) / the matmul peak
measured in the same run (2048^3 GEMM; fp32 peak for fp32 cases, bf16 peak for the others).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

try:  # `python -m bench.train` from the repo root, or `python bench/train.py`
    from bench import common
except ImportError:  # pragma: no cover
    import common

from lmforge.interop.hf import from_hf_state_dict, to_hf_config
from lmforge.loading import build
from lmforge.presets import get_preset

PRESETS = {"gpt2": "gpt2-124m", "llama": "llama-110m"}
CASES = [f"{m}-{d}" for m in PRESETS for d in ("fp32", "bf16", "bf16pure")]
DEFAULT = [c for c in CASES if not c.endswith("bf16pure")]


def make_pair(preset: str):
    """(lmforge model, transformers model) with identical random fp32 weights, in training mode."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = get_preset(preset)
    d = to_hf_config(cfg)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIG_MAPPING[d["model_type"]](**d))
    ours = build(cfg, from_hf_state_dict(cfg, hf.state_dict()), "transformers")
    return ours.train(), hf.train()


def make_optimizer(model: torch.nn.Module, impl: str) -> torch.optim.AdamW:
    """AdamW as nanoGPT sets it up: weight decay on matrices (and embeddings), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kw = {"fused": True} if impl == "fused" else {"foreach": True} if impl == "foreach" else {}
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, **kw)


def optimizer_state_mb(opt: torch.optim.Optimizer) -> float:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor)) / common.MB


def _worker(conn, side: str, name: str, args) -> None:
    """One side of a case in a process of its own, set up as that library sets up a training process.

    Commands from the parent: "warmup" (untimed steps; replies with the first loss and sizes), "step" (one
    timed step; replies with its seconds, page faults, peak RSS and other processes' CPU), "stop".
    """
    import resource

    common.set_threads(args.threads)
    kept = False
    if side == "lmforge" and args.keep_memory:
        from lmforge.train.allocator import keep_freed_memory

        kept = keep_freed_memory()  # what Trainer does (TrainConfig.keep_memory, on by default)
    model_name, mode = name.split("-")
    ours, hf = make_pair(PRESETS[model_name])
    info = {"model": ours.config.name, "vocab": ours.config.vocab_size, "flops_tok": ours.estimate_flops(args.seq)}
    model = ours if side == "lmforge" else hf
    del ours, hf
    gc.collect()
    if mode == "bf16pure":
        model = model.to(torch.bfloat16)
    vocab = info["vocab"]
    B, T = args.batch, args.seq
    data = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16" else contextlib.nullcontext
    forward = (lambda: model(x)) if side == "lmforge" else (lambda: model(input_ids=x, use_cache=False).logits)
    opt = make_optimizer(model, args.optim)
    params = list(model.parameters())

    def step() -> float:
        with amp():
            logits = forward()
        loss = F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    while (cmd := conn.recv()) != "stop":
        if cmd == "warmup":
            losses = [step() for _ in range(args.warmup)]
            conn.send({**info, "first_loss": losses[0] if losses else None, "keep_memory": kept,
                       "weights_mb": common.tensor_mb(model), "optimizer_state_mb": optimizer_state_mb(opt)})
            continue
        gc.collect()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with common.PeakRSS(trim=False) as mem, common.Contention() as other:
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
        conn.send({"s": dt, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                   "peak_mb": mem.peak_mb, "others": other.cores})


def run_case(name: str, args, peaks: dict[str, float]) -> dict[str, Any]:
    """Both sides of one case, each in its own process, stepping in turn; one summary record."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    sides = ("lmforge", "hf")
    conns, procs = {}, {}
    for s in sides:
        conns[s], child = ctx.Pipe()
        procs[s] = ctx.Process(target=_worker, args=(child, s, name, args), daemon=True)
        procs[s].start()
    try:
        info = {}
        for s in sides:  # one side at a time, so warm-up steps do not share the cores
            conns[s].send("warmup")
            info[s] = conns[s].recv()
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        waited = 0.0
        for _ in range(args.steps):
            waited += common.wait_quiet(args.wait_quiet)
            for s in sides:
                conns[s].send("step")
                runs[s].append(conns[s].recv())
        for s in sides:
            conns[s].send("stop")
    finally:
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    B, T = args.batch, args.seq
    mode = name.split("-")[1]
    flops_tok = info["lmforge"]["flops_tok"]
    peak_flops = peaks["bf16" if mode.startswith("bf16") else "fp32"] * 1e9
    out: dict[str, Any] = {"case": name, "model": info["lmforge"]["model"], "mode": mode, "batch": B, "seq": T,
                           "threads": torch.get_num_threads(), "steps": args.steps, "optimizer": args.optim,
                           "clip": args.clip}
    summ = {}
    for s in sides:
        # best-of-N is the primary figure: other processes share this machine and only ever slow a step down
        ts = sorted(r["s"] for r in runs[s])
        tps = B * T / ts[0]
        summ[s] = {"tok_s_best": tps, "tok_s_median": B * T / ts[len(ts) // 2], "step_s_best": ts[0],
                   "mfu": tps * flops_tok / peak_flops, "peak_rss_mb": max(r["peak_mb"] for r in runs[s]),
                   "page_faults_per_step": sorted(r["faults"] for r in runs[s])[len(ts) // 2],
                   "keep_memory": info[s]["keep_memory"], "weights_mb": info[s]["weights_mb"],
                   "optimizer_state_mb": info[s]["optimizer_state_mb"], "first_loss": info[s]["first_loss"],
                   "others_cores": sum(r["others"] for r in runs[s]) / len(runs[s])}
    out.update({"lmforge_tok_s": summ["lmforge"]["tok_s_best"], "hf_tok_s": summ["hf"]["tok_s_best"],
                "ratio": summ["lmforge"]["tok_s_best"] / summ["hf"]["tok_s_best"],
                "median_ratio": summ["lmforge"]["tok_s_median"] / summ["hf"]["tok_s_median"],
                "lmforge_mfu": summ["lmforge"]["mfu"], "hf_mfu": summ["hf"]["mfu"],
                "flops_per_token": flops_tok, "peak_gflops": peak_flops / 1e9, "waited_s": waited,
                # CPU cores other processes used during the timed steps; above ~0.2 the figures are disturbed
                "others_cores": sum(summ[s]["others_cores"] for s in sides) / len(sides), **summ})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help=f"comma-separated, prefixes allowed, or 'all' (default: {', '.join(DEFAULT)});"
                                    f" all: {', '.join(CASES)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side (default 2)")
    ap.add_argument("--steps", "--repeats", type=int, default=5, dest="steps",
                    help="timed steps per side (best and median reported; default 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both sides (default 2)")
    ap.add_argument("--optim", choices=("fused", "foreach", "default"), default="fused",
                    help="AdamW implementation for both sides (default fused, as lmforge's trainer; 'default' is "
                         "torch's own choice, the for-loop one on CPU)")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping for both sides (0: off)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each round of timed steps, wait up to S seconds for other processes to go idle")
    ap.add_argument("--no-keep-memory", dest="keep_memory", action="store_false",
                    help="run lmforge's side without the trainer's malloc setting (lmforge/train/allocator.py), "
                         "so that only the models differ")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2 x 64, 1 warm-up + 2 timed steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 2
    cases = common.parse_cases(args.cases, CASES, DEFAULT)
    common.set_threads(args.threads)
    common.wait_quiet(args.wait_quiet)
    peaks = {"fp32": common.measure_matmul_peak(torch.float32), "bf16": common.measure_matmul_peak(torch.bfloat16)}
    common.emit({"case": "machine", **common.machine_info(), "loadavg_1m": os.getloadavg()[0],
                 "matmul_fp32_gflops": peaks["fp32"], "matmul_bf16_gflops": peaks["bf16"]})
    common.run_cases("train", cases, lambda name: run_case(name, args, peaks))


if __name__ == "__main__":
    main()
