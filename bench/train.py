"""Training-step benchmark: lmforge's `DecoderLM` against the `transformers` model, side by side.

One step is what `lmforge.train` does per optimizer step, written out here so the benchmark does not depend
on the trainer: forward, cross-entropy on fp32 logits, backward, gradient clipping to norm 1, AdamW step
(fused kernel, as the trainer's default), zero grads. Both sides hold identical weights and run the same
loss code, the same optimizer settings (lr 3e-4, betas 0.9/0.95, weight decay 0.1 on matrices only), the
same batch and threads, in one process; steps alternate between the sides so that load from other
processes hits both alike. Cases:

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

from lmforge.config import get_preset
from lmforge.interop.hf import from_hf_state_dict, to_hf_config
from lmforge.llm import build

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


def run_case(name: str, args, peaks: dict[str, float]) -> dict[str, Any]:
    model_name, mode = name.split("-")
    ours, hf = make_pair(PRESETS[model_name])
    if mode == "bf16pure":
        ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    vocab = ours.config.vocab_size
    B, T = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (B, T + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16" else contextlib.nullcontext
    forward = {"lmforge": lambda: ours(x), "hf": lambda: hf(input_ids=x, use_cache=False).logits}
    opts = {"lmforge": make_optimizer(ours, args.optim), "hf": make_optimizer(hf, args.optim)}
    params = {"lmforge": list(ours.parameters()), "hf": list(hf.parameters())}

    def step(side: str) -> float:
        with amp():
            logits = forward[side]()
        loss = F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params[side], args.clip)
        opts[side].step()
        opts[side].zero_grad(set_to_none=True)
        return loss.detach().item()

    sides = ("lmforge", "hf")
    first_loss = {}
    for i in range(args.warmup):
        for s in sides:
            loss = step(s)
            if i == 0:
                first_loss[s] = loss
    times: dict[str, list[float]] = {s: [] for s in sides}
    delta: dict[str, float] = dict.fromkeys(sides, 0.0)
    peak: dict[str, float] = dict.fromkeys(sides, 0.0)
    busy: dict[str, list[float]] = {s: [] for s in sides}
    waited = 0.0
    for _ in range(args.steps):
        waited += common.wait_quiet(args.wait_quiet)
        for s in sides:
            gc.collect()
            with common.PeakRSS() as mem, common.Contention() as other:
                t = time.perf_counter()
                step(s)
                times[s].append(time.perf_counter() - t)
            delta[s], peak[s] = max(delta[s], mem.delta_mb), max(peak[s], mem.peak_mb)
            busy[s].append(other.cores)

    flops_tok = ours.estimate_flops(T)
    peak_flops = peaks["bf16" if mode.startswith("bf16") else "fp32"] * 1e9
    out: dict[str, Any] = {"case": name, "model": ours.config.name, "mode": mode, "batch": B, "seq": T,
                           "threads": torch.get_num_threads(), "steps": args.steps, "optimizer": args.optim,
                           "clip": args.clip}
    summ = {}
    for s in sides:
        # best-of-N is the primary figure: other processes share this machine and only ever slow a step down
        ts = sorted(times[s])
        tps = B * T / ts[0]
        summ[s] = {"tok_s_best": tps, "tok_s_median": B * T / ts[len(ts) // 2], "step_s_best": ts[0],
                   "mfu": tps * flops_tok / peak_flops, "rss_delta_mb": delta[s], "peak_rss_mb": peak[s],
                   "weights_mb": common.tensor_mb(ours if s == "lmforge" else hf),
                   "optimizer_state_mb": optimizer_state_mb(opts[s]), "first_loss": first_loss[s],
                   "others_cores": sum(busy[s]) / len(busy[s])}
    out.update({"lmforge_tok_s": summ["lmforge"]["tok_s_best"], "hf_tok_s": summ["hf"]["tok_s_best"],
                "ratio": summ["lmforge"]["tok_s_best"] / summ["hf"]["tok_s_best"],
                "median_ratio": summ["lmforge"]["tok_s_median"] / summ["hf"]["tok_s_median"],
                "lmforge_mfu": summ["lmforge"]["mfu"], "hf_mfu": summ["hf"]["mfu"],
                "flops_per_token": flops_tok, "peak_gflops": peak_flops / 1e9, "waited_s": waited,
                # CPU cores other processes used during the timed steps; above ~0.2 the figures are disturbed
                "others_cores": sum(map(sum, busy.values())) / sum(map(len, busy.values())), **summ})
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
    for name in cases:
        common.note(f"[train] {name} ...")
        rec = run_case(name, args, peaks)
        rec["loadavg_1m"] = os.getloadavg()[0]
        common.emit(rec)
        gc.collect()


if __name__ == "__main__":
    main()
