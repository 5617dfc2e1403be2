"""The baselines table: held-out perplexity and bits per byte of count-based n-grams, an LSTM,
teenyGPT and the quickstart transformer, all scored by the one perplexity eval on the test split of the
embedded corpus (Macbeth, The Tempest).

    nice -n 19 .venv/bin/python bench/baselines.py [--steps 400] [--out runs/baselines]

Steps (each neural model gets the same number of optimizer steps, so the table does not depend on how busy
the machine is: the quickstart and the LSTM see the same 16 x 256-token batches of the same shards, 400
steps being about what the quickstart fits in its 180 s budget on a quiet 2-core machine):
1. `lmforge quickstart` (4,096-token BPE + 4.07M-parameter Llama-style decoder) into OUT/quickstart;
2. recipes/lstm.yaml on exactly the quickstart's tokenizer and shards (`tokenizer.path`, `data.path`);
3. recipes/teenygpt.yaml (29 characters, its own passages, 32 x 150 characters a step) for as many steps;
4. n-grams counted on the quickstart's train shard (Kneser-Ney and backoff, orders 3 and 4) and a
   Kneser-Ney one on teenyGPT's characters;
5. `lmforge.evaluate.perplexity` of every model on the test split: one JSON line per model, then a
   markdown table. `--skip-train` re-scores the models already in OUT.

Bits per byte divides by the UTF-8 bytes of the text each tokenizer scores. teenyGPT's characters see
the text lower-cased with punctuation and newlines removed (its `normalize`), which is fewer bytes and an
easier text: its rows are comparable with each other, not with the BPE rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Contention, emit, note  # noqa: E402

import lmforge  # noqa: E402
from lmforge.data.texts import read_texts  # noqa: E402
from lmforge.evaluate import perplexity  # noqa: E402


def _last_step(run: Path) -> int | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [json.loads(line).get("step") for line in path.read_text().splitlines() if line.strip()]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def train(out: Path, steps: int) -> dict[str, dict]:
    from lmforge.commands.train import pretrain, quickstart

    info = {}
    # a step budget, not a time budget: no time clock, so the same run gives the same model on any machine
    by_steps = [f"train.max_steps={steps}", "train.time_budget=null", "train.schedule_clock=steps"]
    for name, fn in (
        # quickstart sizes itself to min(steps, what fits in the budget): an unreachable budget leaves `steps`
        ("quickstart", lambda: quickstart(steps=steps, out=str(out / "quickstart"), time_budget=1e9,
                                          progress=False)),
        ("lstm", lambda: pretrain("recipes/lstm.yaml", [f"run.dir={out / 'lstm'}", *by_steps,
                                                         f"tokenizer.path={out / 'quickstart' / 'tokenizer'}",
                                                         f"data.path={out / 'quickstart' / 'data'}"])),
        ("teenygpt", lambda: pretrain("recipes/teenygpt.yaml", [f"run.dir={out / 'teenygpt'}", *by_steps,
                                                                 "train.max_epochs=null"])),
    ):
        note(f"training {name} ({steps} steps)")
        t0 = time.perf_counter()
        with Contention() as c:
            rc = fn()
        if rc:
            raise SystemExit(f"{name}: training exited with {rc}")
        info[name] = {"train_s": round(time.perf_counter() - t0, 1), "steps": _last_step(out / name),
                      "others_cores": round(c.cores, 2)}
    (out / "train_info.json").write_text(json.dumps(info, indent=1))
    return info


def fit_ngrams(out: Path) -> dict[str, dict]:
    from lmforge.tokenizers import CharTokenizer
    from lmforge.train.ngram import fit_ngram

    info = {}
    tok = out / "quickstart" / "tokenizer"
    specs = [(f"ngram-{m}-{n}", tok, m, n, out / "quickstart" / "data") for m in ("kneser_ney", "backoff")
             for n in (3, 4)] + [("ngram-kneser_ney-5-chars", CharTokenizer(), "kneser_ney", 5, None)]
    for name, t, method, order, data_dir in specs:
        t0 = time.perf_counter()
        llm = fit_ngram(t, "shakespeare", order=order, method=method, data_dir=data_dir)
        llm.save(out / name)
        info[name] = {"train_s": round(time.perf_counter() - t0, 1), "ngrams": llm.model.num_params()}
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/baselines")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per neural model")
    ap.add_argument("--skip-train", action="store_true", help="score the models already in --out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N test tokens (smoke runs)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.skip_train:
        info = json.loads((out / "train_info.json").read_text())
    else:
        info = train(out, a.steps)
    info.update(fit_ngrams(out))
    texts = read_texts("shakespeare", "test")
    rows = []
    order = ["ngram-backoff-3", "ngram-backoff-4", "ngram-kneser_ney-3", "ngram-kneser_ney-4", "lstm", "quickstart",
             "ngram-kneser_ney-5-chars", "teenygpt"]
    for name in order:
        folder = out / name / "model" if name in ("quickstart", "lstm", "teenygpt") else out / name
        llm = lmforge.load(folder)
        is_ngram = llm.config.family == "ngram"
        n = llm.config.order if is_ngram else 0
        # an n-gram scores the same with any window >= order - 1: no overlap needed, so no repeated work
        kw = {"max_length": 512, "stride": 512 - n + 1} if is_ngram else {}
        with Contention() as c:
            r = perplexity(llm, texts, max_tokens=a.max_tokens, **kw)
        params = llm.model.num_params()
        rec = {"model": name, "tokenizer": f"{llm.tokenizer.vocab_size}-token "
               + ("chars" if llm.tokenizer.vocab_size < 64 else "BPE"),
               "params_or_ngrams": params, **info.get(name, {}), **r.to_dict(), "eval_others_cores": round(c.cores, 2),
               "load": os.getloadavg()[0]}
        emit(rec)
        rows.append(rec)
    print("\n| model | tokenizer | parameters / n-grams | training | test perplexity | bits/byte |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        trained = (f"{r['steps']} steps, {r['train_s']:.0f} s" if r.get("steps") is not None
                   else f"counted in {r['train_s']:.0f} s")
        print(f"| {r['model']} | {r['tokenizer']} | {r['params_or_ngrams']:,} | {trained} | "
              f"{r['perplexity']:.2f} | {r['bits_per_byte']:.3f} |")


if __name__ == "__main__":
    main()
