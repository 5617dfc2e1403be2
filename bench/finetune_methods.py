"""Every fine-tuning method's recipe on SmolLM2-135M-Instruct, briefly: the README's results table.

For the base model and each recipe in recipes/smollm2-135m/ (run through `lmforge finetune`, the same
path as the CLI), one JSON line: trainable parameters (% of the model), held-out loss on the test split's
answers (Macbeth, The Tempest: plays the training set never shows), multiple-choice accuracy on its
speaker and work questions (chance is 0.25), and wall time. Runs are short (--steps optimizer steps of
--batch examples): a smoke-level comparison on a busy 2-core machine, not a converged one.

    python bench/finetune_methods.py [--methods full,lora,...] [--steps 12] [--batch 4] [--seq 192]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

try:
    from bench import common
except ImportError:  # pragma: no cover
    import common

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "dora", "qlora", "adalora", "adapter", "prefix", "prompt"]


def base_row(seq: int) -> dict:
    """The untrained model's scores on the same test split."""
    import lmforge
    from lmforge.data.instruct import collate, load_splits, render_rows
    from lmforge.train.finetune import choice_accuracy
    from lmforge.train.objectives import CausalLM
    from lmforge.train.trainer import evaluate

    llm = lmforge.load("smollm2", dtype="float32", dequantize=True)
    test = load_splits("shakespeare-instruct")["test"]
    ex = render_rows(llm.tokenizer, test, seq + 1)
    pad = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else llm.tokenizer.eos_id
    loss = evaluate(llm.model, CausalLM(), (collate(ex[i:i + 8], pad) for i in range(0, len(ex), 8)))
    return {"method": "base", "trainable_pct": 0.0, "test_loss": loss["loss"],
            **choice_accuracy(llm.model, llm.tokenizer, test)}


def method_row(method: str, args, tmp: str) -> dict:
    from lmforge.commands.train import finetune

    run = Path(tmp) / method
    sets = [f"run.dir={run}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
            f"train.seq_len={args.seq}", "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false",
            f"train.threads={args.threads}", "optim.warmup_steps=2"]
    t0 = time.perf_counter()
    with common.Contention() as busy:
        rc = finetune(config=str(ROOT / "recipes" / "smollm2-135m" / f"{method}.yaml"), set_=sets)
    if rc:
        return {"method": method, "error": f"exit code {rc}"}
    rep = json.loads((run / "test_metrics.json").read_text())
    return {"method": method, "trainable_pct": rep["trainable"]["percent"], "test_loss": rep["test"]["loss"],
            "choice_acc": rep["test"].get("choice_acc"), "val_loss": rep["val"].get("loss"),
            "train_s": rep["elapsed_s"], "wall_s": time.perf_counter() - t0, "others_cores": busy.cores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=None, help=f"comma-separated from {METHODS} and base (default all)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    methods = common.parse_cases(args.methods, ["base", *METHODS], ["base", *METHODS])
    common.set_threads(args.threads)
    common.emit({"machine": common.machine_info(), "steps": args.steps, "batch": args.batch, "seq": args.seq})
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            common.note(f"[finetune_methods] {m} ...")
            row = base_row(args.seq) if m == "base" else method_row(m, args, tmp)
            row["loadavg_1m"] = os.getloadavg()[0]
            common.emit(row)


if __name__ == "__main__":
    main()
