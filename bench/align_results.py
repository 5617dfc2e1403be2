"""Results for the README's alignment / merging / pruning / distillation section (not a side-by-side benchmark).

Every part starts from one small pretrained model folder (`--base`, e.g. a `lmforge quickstart` run's
model) and prints one JSON line per measurement. Parts run separately, each a short job:

    python bench/align_results.py --base runs/quickstart/model --part prune
    python bench/align_results.py --base runs/quickstart/model --part distill --steps 150
    python bench/align_results.py --base runs/quickstart/model --part merge --steps 60
    python bench/align_results.py --base runs/quickstart/model --part align --method dpo --steps 60

prune: magnitude 50%, 2:4, half the attention heads, half the MLP channels (no retraining): parameters,
test-split perplexity (Macbeth + The Tempest, first --eval-tokens tokens), greedy decode tokens/s.
distill: the base (teacher) into a student of half its layers (initialised from every other teacher
layer), --steps steps of KL (T=2) + next-token loss on the train split.
merge: two full fine-tunes of the base, on the first 80% of Julius Caesar (A) and of Twelfth Night (B),
then average / task arithmetic / TIES / DARE merges; perplexity on the last 20% of each play.
align: LoRA (r 8, attention) on the shipped preference set (data/shakespeare_instruct), then preference
accuracy on its test split: DPO-family implicit reward (beta * log-ratio to the adapters-off reference),
the reward model's score, and for PPO the policy's implicit reward as for DPO; PPO uses the reward model
of --reward-model and reports the rollout reward and KL before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Contention, machine_info  # noqa: E402


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def _text(llm, work: str, part: slice) -> str:
    from lmforge.data.corpus import read_work

    t = read_work(work)
    n = len(t)
    return t[int(part.start * n) if part.start else 0:int(part.stop * n) if part.stop else n]


def part_prune(args) -> None:
    import lmforge
    from lmforge.compress import magnitude_prune, prune_heads, prune_mlp, semi_structured_prune
    from lmforge.compress.report import held_out_text, measure

    text = held_out_text("shakespeare", "test")
    base = lmforge.load(args.base)
    emit({"part": "prune", "method": "none", **measure(base, text, args.eval_tokens)})
    for name, fn in (("magnitude-50%", lambda m: magnitude_prune(m, 0.5)), ("2:4", semi_structured_prune),
                     ("heads-keep-50%", lambda m: prune_heads(m, 0.5)), ("mlp-keep-50%", lambda m: prune_mlp(m, 0.5))):
        llm = lmforge.load(args.base)
        out = fn(llm.model)
        llm = lmforge.LLM(out if out is not None else llm.model, llm.tokenizer)
        emit({"part": "prune", "method": name, **measure(llm, text, args.eval_tokens)})


def _windows(tok, text: str, seq_len: int, batch: int, seed: int):
    import numpy as np

    from lmforge.train import TokenWindows

    ids = np.array(tok.encode(text, add_special_tokens=False), dtype=np.int64)
    return TokenWindows(ids, batch, seq_len, seed=seed)


def part_distill(args) -> None:
    import lmforge
    from lmforge.compress.distill import Distill, student_from_teacher
    from lmforge.compress.report import held_out_text, measure
    from lmforge.data import iter_documents
    from lmforge.train import OptimConfig, TrainConfig, Trainer

    text = held_out_text("shakespeare", "test")
    teacher = lmforge.load(args.base)
    emit({"part": "distill", "model": "teacher", "layers": teacher.config.n_layer,
          **measure(teacher, text, args.eval_tokens)})
    student = student_from_teacher(teacher.model, max(1, teacher.config.n_layer // 2))
    s_llm = lmforge.LLM(student, teacher.tokenizer)
    emit({"part": "distill", "model": "student-init", "layers": student.config.n_layer,
          **measure(s_llm, text, args.eval_tokens)})
    train_text = "\n".join(d for _, d in zip(range(8), iter_documents("shakespeare", "train")))
    data = _windows(teacher.tokenizer, train_text, 128, 8, 0)
    for kind, alpha in (("kd", 0.5), ("ce-only", 0.0)):
        torch.manual_seed(0)
        st = student_from_teacher(teacher.model, max(1, teacher.config.n_layer // 2))
        data = _windows(teacher.tokenizer, train_text, 128, 8, 0)
        t0 = time.perf_counter()
        Trainer(st, Distill(teacher.model, temperature=2.0, alpha=alpha), data,
                TrainConfig(max_steps=args.steps, eval_every=0, progress=False, threads=args.threads),
                OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.0)).fit()
        emit({"part": "distill", "model": f"student-{kind}", "steps": args.steps,
              "train_s": round(time.perf_counter() - t0, 1), **measure(lmforge.LLM(st, teacher.tokenizer), text,
                                                                        args.eval_tokens)})


def part_merge(args) -> None:
    import lmforge
    from lmforge.compress.merging import merge_models
    from lmforge.evaluate.perplexity import perplexity
    from lmforge.train import CausalLM, OptimConfig, TrainConfig, Trainer

    base = lmforge.load(args.base)
    tok = base.tokenizer
    plays = {"A": "julius_caesar", "B": "twelfth_night"}
    held = {k: _text(base, w, slice(0.8, None)) for k, w in plays.items()}

    def ppl(llm) -> dict:
        return {f"ppl_{k}": round(perplexity(llm, t, max_tokens=args.eval_tokens).perplexity, 2)
                for k, t in held.items()}

    emit({"part": "merge", "model": "base", **ppl(base)})
    fts = []
    for k, w in plays.items():
        llm = lmforge.load(args.base)
        data = _windows(tok, _text(llm, w, slice(0, 0.8)), 128, 8, 0)
        Trainer(llm.model, CausalLM(), data, TrainConfig(max_steps=args.steps, eval_every=0, progress=False,
                                                         threads=args.threads),
                OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5)).fit()
        llm.model.eval()
        fts.append(llm)
        emit({"part": "merge", "model": f"fine-tune {k} ({w})", **ppl(llm)})
    for method, kw in (("average", {}), ("task_arithmetic", {}), ("ties", {"density": 0.5}),
                       ("dare", {"density": 0.5}), ("dare_ties", {"density": 0.5})):
        merged = merge_models(fts, base=base, method=method, **kw)
        emit({"part": "merge", "model": f"merge {method}", **kw, **ppl(merged)})


def part_align(args) -> None:
    from lmforge.commands.align import align

    m = args.method
    run = Path(args.out) / m
    sets = [f"model.source={args.base}", f"train.max_steps={args.steps}", "train.seq_len=256",
            f"train.eval_every={args.steps}", "train.checkpoint_every=0", "train.progress=false",
            f"train.threads={args.threads}", f"run.dir={run}", "optim.warmup_steps=5", f"optim.lr={args.lr}",
            f"optim.min_lr={args.lr / 10}",
            "adapter.target_modules=[q_proj, k_proj, v_proj, o_proj, up_proj, down_proj]"]
    if m == "ppo":
        sets += [f"align.reward_model={args.reward_model}", "align.max_new_tokens=24", "train.eval_every=0"]
    t0 = time.perf_counter()
    align(config=str(ROOT / "recipes" / "smollm2" / f"{m}.yaml"), set_=sets)
    rep = json.loads((run / "align_metrics.json").read_text())
    emit({"part": "align", "method": m, "steps": args.steps, "s": round(time.perf_counter() - t0, 1), **rep})


@torch.no_grad()
def part_prefbase(args) -> None:
    """The untouched base model's preference accuracy on the test pairs: log p(chosen) > log p(rejected)."""
    import lmforge
    from lmforge.align.data import collate, tokenize_pairs
    from lmforge.align.logps import sequence_logps
    from lmforge.align.recipe import preference_records

    llm = lmforge.load(args.base)
    tok = llm.tokenizer
    pairs = tokenize_pairs(preference_records("shakespeare-prefs", "test"), tok, chat=True, max_len=257)
    hits_sum = hits_mean = 0
    for i in range(0, len(pairs), 8):
        chunk = pairs[i:i + 8]
        lp, n = sequence_logps(llm.model.eval(), collate(chunk, tok.pad_id or 0))
        B = len(chunk)
        hits_sum += int((lp[:B] > lp[B:]).sum())
        hits_mean += int((lp[:B] / n[:B] > lp[B:] / n[B:]).sum())
    emit({"part": "align", "method": "base (no training)", "test_pairs": len(pairs),
          "acc_sum_logp": round(hits_sum / len(pairs), 4), "acc_mean_logp": round(hits_mean / len(pairs), 4)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--part", choices=["prune", "distill", "merge", "align", "prefbase"], required=True)
    ap.add_argument("--method", default="dpo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--reward-model", default=None)
    ap.add_argument("--out", default="runs/align_results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    with Contention() as busy:
        parts = {"prune": part_prune, "distill": part_distill, "merge": part_merge, "align": part_align,
                 "prefbase": part_prefbase}
        parts[args.part](args)
    emit({"part": "machine", "others_cores": round(busy.cores, 2),
          **{k: info[k] for k in ("cpu", "threads", "torch")}})


if __name__ == "__main__":
    main()
