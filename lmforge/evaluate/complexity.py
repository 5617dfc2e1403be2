"""The complexity study: the block families' claimed complexities (a table adapted from Peng et al. 2024), measured.

For each block family at matched parameter count (same d_model, vocab and width; layer counts set so
the non-embedding parameters agree within ~10%): training time per token and activation memory vs
sequence length, decode time per token and decode-state memory vs position, growth exponents fitted on
log-log scales, the claimed complexities (`SEED_CLAIMS`) beside them, and log-log PNG plots.

Memory is counted exactly rather than read from the process: training memory is the bytes autograd saves
for backward (a `saved_tensors_hooks` tally, unique storages once); decode memory is the cache's state
(`Cache.bytes()`: KV buffers for attention, the fixed recurrent state otherwise). Times are wall clock
on a shared machine and noisy; the fits use the larger lengths, where the leading term dominates.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from lmforge.config import Config
from lmforge.models import DecoderLM
from lmforge.presets import get_preset

# the claimed complexities, after Peng et al. 2024's table: (training time, training memory, decode time per token,
# decode memory)
SEED_CLAIMS = {
    "transformer": ("O(N^2)", "O(N)", "O(N)", "O(N)"),
    "linear": ("O(N)", "O(N)", "O(1)", "O(1)"),
    "mamba": ("O(N)", "O(N)", "O(1)", "O(1)"),
    "s4d": ("O(N log N)", "O(N)", "O(1)", "O(1)"),
    "retnet": ("O(N)", "O(N)", "O(1)", "O(1)"),
    "rwkv": ("O(N)", "O(N)", "O(1)", "O(1)"),
    # not in that table; the papers' own claims: Reformer (Kitaev et al. 2020) O(N log N) time and
    # O(N) memory with a growing key cache at decode; Transformer-XL (Dai et al. 2019) attends over one
    # segment plus a fixed memory, so a decode step and its state do not grow with position
    "lsh": ("O(N log N)", "O(N)", "O(N)", "O(N)"),
    "xl": ("O(N^2)", "O(N^2)", "O(1)", "O(1)"),
}
# the exponent each claim predicts for time/memory vs N (per-token decode time: O(N) -> 1, O(1) -> 0)
_EXPONENT = {"O(N^2)": 2.0, "O(N log N)": 1.0, "O(N)": 1.0, "O(1)": 0.0}


def family_configs(d_model: int = 256, n_layer: int = 4, vocab: int = 256, context: int = 8192 + 64
                   ) -> dict[str, Config]:
    """Dense transformer, linear transformer and Mamba of about the same non-embedding parameter count.

    A transformer layer is ~16 d^2 (attention 4, SwiGLU MLP 12); a Mamba layer ~6.5 d^2 (in 4, out 2, x/dt
    projections), so Mamba gets 2.5x the layers (the Mamba paper also doubles layers to match); S4D's
    mixer is ~d^2, so its MLP is widened to 5d; RWKV's time-mix is 4 d^2, its channel-mix widened to 5.5d."""
    base = get_preset("tiny-llama").replace(vocab_size=vocab, block_size=context, d_model=d_model, n_layer=n_layer,
                                            **{"attention.n_head": max(1, d_model // 64),
                                               "attention.n_kv_head": max(1, d_model // 64),
                                               "mlp.hidden": 4 * d_model})
    dense = base.replace(name="transformer")
    linear = base.replace(name="linear", block="linear_attention+mlp", **{"position.kind": "none"})
    mamba = base.replace(name="mamba", block="mamba+none", n_layer=5 * n_layer // 2, **{"position.kind": "none"})
    s4d = base.replace(name="s4d", block="s4d+mlp", **{"position.kind": "none", "ssm.d_state": 64,
                                                             "mlp.hidden": 5 * d_model})
    retnet = base.replace(name="retnet", block="retention+mlp")
    rwkv = base.replace(name="rwkv", block="rwkv+rwkv", **{"position.kind": "none", "mlp.hidden": 11 * d_model // 2})
    # LSH: shared QK saves d^2 a layer, given back to the MLP; 64-token chunks, 64 buckets (about a chunk
    # each at 4,096 tokens), 2 rounds
    lsh = base.replace(name="lsh", block="lsh_attention+mlp", **{
        "lsh.chunk_len": 64, "lsh.n_buckets": 64, "lsh.n_hashes": 2, "mlp.hidden": 4 * d_model + d_model // 3})
    # XL: W_R adds d^2 a layer, taken from the MLP; relative positions only, a memory of 256 hidden states
    xl = base.replace(name="xl", block="xl_attention+mlp", **{"position.kind": "none", "xl.mem_len": 256,
                                                              "mlp.hidden": 4 * d_model - d_model // 3})
    return {"transformer": dense, "linear": linear, "mamba": mamba, "s4d": s4d, "retnet": retnet, "rwkv": rwkv,
            "lsh": lsh, "xl": xl}


def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of tensors autograd saves for backward while `fn()` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_training(model: DecoderLM, T: int, repeats: int = 2) -> dict[str, float]:
    """Forward + backward of one (1, T) sequence: seconds per token and saved activation bytes."""
    model.train()
    x = torch.randint(0, model.config.vocab_size, (1, T))

    def step():
        model.zero_grad(set_to_none=True)
        mem, logits = saved_bytes(lambda: model(x))
        logits.float().logsumexp(-1).mean().backward()
        return mem

    mem = step()  # warm-up, and the memory tally
    return {"seq_len": T, "s_per_token": _best(step, repeats) / T, "train_mem_bytes": mem}


def _prefill(model: DecoderLM, position: int, extra: int):
    """A batch-1 cache holding `position` random tokens, read in pieces of 512 (Transformer-XL's
    segment-by-segment evaluation; it also keeps the score matrices of the attention families small); every
    family's cache continues exactly across them. Room is left for `extra` more tokens."""
    cache = model.new_cache(1, max_len=position + extra + 1)
    prefix = torch.randint(0, model.config.vocab_size, (1, position))
    for s in range(0, position, 512):
        model(prefix[:, s:s + 512], cache=cache, logits_to_keep=1)
    return cache


@torch.inference_mode()
def measure_decode(model: DecoderLM, position: int, steps: int = 8, repeats: int = 1) -> dict[str, float]:
    """Batch-1 decode steps right after a prefix of `position` tokens: seconds per token (the best of
    `repeats` rounds of `steps` steps, after one warm-up step) and state bytes (an attention cache is
    allocated for the prefix and these steps, so its bytes include their slots)."""
    model.eval()
    cache = _prefill(model, position, steps * repeats + 1)
    tok = torch.zeros(1, 1, dtype=torch.long)
    model(tok, cache=cache, logits_to_keep=1)  # warm-up step
    best = _best(lambda: [model(tok, cache=cache, logits_to_keep=1) for _ in range(steps)], repeats)
    return {"position": position, "s_per_token": best / steps, "state_bytes": cache.bytes()}


def decode_vs_dense(positions=(512, 4096), d_model: int = 256, n_layer: int = 4, steps: int = 16,
                    rounds: int = 7, log=print) -> dict:
    """Mamba's batch-1 decode step against the dense transformer of about the same parameter count
    (`family_configs`: 2.5x the layers), at each position: both caches prefilled, then rounds of `steps`
    steps alternating between the two models (so load from other processes hits both alike), the best round
    of each kept. Returns per position the ms per token of each and the ratio mamba / transformer."""
    torch.manual_seed(0)
    cfgs = family_configs(d_model, n_layer, context=64 * math.ceil((max(positions) + steps * (rounds + 1) + 2) / 64))
    models = {n: DecoderLM(cfgs[n]).eval() for n in ("transformer", "mamba")}  # built outside inference mode
    out = {"params": {n: m.num_params(non_embedding=True) for n, m in models.items()}, "positions": {}}
    tok = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        for p in positions:
            caches = {n: _prefill(m, p, steps * (rounds + 1) + 1) for n, m in models.items()}
            best = dict.fromkeys(models, math.inf)
            for r in range(rounds + 1):  # the first round is a warm-up
                for n, m in models.items():
                    t = time.perf_counter()
                    for _ in range(steps):
                        m(tok, cache=caches[n], logits_to_keep=1)
                    if r:
                        best[n] = min(best[n], (time.perf_counter() - t) / steps)
            row = {f"{n}_ms": best[n] * 1e3 for n in models}
            row["ratio"] = best["mamba"] / best["transformer"]
            out["positions"][p] = row
            log(json.dumps({"decode_vs_dense": p, **row}))
    return out


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than 2 points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else None


def run_study(train_lengths=(256, 512, 1024, 2048, 4096, 8192), positions=(512, 1024, 2048, 4096, 8192),
              d_model: int = 256, n_layer: int = 4, budget_s: float = 20.0, max_train_bytes: float = 2e9,
              log=print, families: tuple[str, ...] | None = None) -> dict:
    """Measure every family (or those named in `families`).

    Longer lengths are skipped for a family once one measurement took over `budget_s`, or when the
    activations of the next training length would pass `max_train_bytes`
    (extrapolated linearly from the last one; the machine is shared)."""
    torch.manual_seed(0)
    out: dict = {"families": {}}
    for name, cfg in family_configs(d_model, n_layer).items():
        if families is not None and name not in families:
            continue
        model = DecoderLM(cfg)
        fam = {"params": model.num_params(non_embedding=True), "train": [], "decode": []}
        for T in train_lengths:
            if fam["train"] and fam["train"][-1]["train_mem_bytes"] * T / fam["train"][-1]["seq_len"] > max_train_bytes:
                break
            t0 = time.perf_counter()
            fam["train"].append(measure_training(model, T))
            log(json.dumps({"family": name, **fam["train"][-1]}))
            if time.perf_counter() - t0 > budget_s:
                break
        for p in positions:
            t0 = time.perf_counter()
            fam["decode"].append(measure_decode(model, p))
            log(json.dumps({"family": name, **fam["decode"][-1]}))
            if time.perf_counter() - t0 > budget_s:
                break
        big = [r for r in fam["train"] if r["seq_len"] >= 1024] or fam["train"]
        lens, pos = [r["seq_len"] for r in big], [r["position"] for r in fam["decode"]]
        fam["fit"] = {
            "train_time": fit_exponent(lens, [r["s_per_token"] * r["seq_len"] for r in big]),
            "train_mem": fit_exponent(lens, [r["train_mem_bytes"] for r in big]),
            "decode_time": fit_exponent(pos, [r["s_per_token"] for r in fam["decode"]]),
            "decode_mem": fit_exponent(pos, [r["state_bytes"] for r in fam["decode"]]),
        }
        out["families"][name] = fam
    return out


def table(study: dict) -> str:
    """A Markdown table: fitted exponents beside the claimed ones (claim -> expected exponent); families the
    table leaves out (LSH, XL) show their paper's claim."""
    rows = ["| family | params (non-emb.) | training time | training memory | decode time/token | decode memory |",
            "|---|---|---|---|---|---|"]
    for name, fam in study["families"].items():
        claims = SEED_CLAIMS[name]
        cells = []
        for claim, key in zip(claims, ("train_time", "train_mem", "decode_time", "decode_mem")):
            v = fam["fit"][key]
            src = "paper" if name in ("lsh", "xl") else "seed"
            cells.append(f"N^{v:.2f} ({src} {claim})" if v is not None else f"- ({src} {claim})")
        rows.append(f"| {name} | {fam['params'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(study: dict, path: str | Path) -> Path:
    """Four log-log panels (training time, training memory, decode time, decode memory) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("train", "seq_len", lambda r: r["s_per_token"] * r["seq_len"], "training s / sequence"),
              ("train", "seq_len", lambda r: r["train_mem_bytes"] / 2**20, "training activations (MiB)"),
              ("decode", "position", lambda r: r["s_per_token"] * 1e3, "decode ms / token"),
              ("decode", "position", lambda r: r["state_bytes"] / 2**20, "decode state (MiB)")]
    for ax, (part, xk, f, title) in zip(axes, panels):
        for name, fam in study["families"].items():
            rows = fam[part]
            ax.loglog([r[xk] for r in rows], [f(r) for r in rows], "o-", label=name, base=2)
        ax.set_title(title)
        ax.set_xlabel("sequence length" if part == "train" else "position")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
