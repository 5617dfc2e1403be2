"""llama.cpp's side of bench/quant.py, run as a process of its own that never imports torch (so its peak RSS is
llama.cpp's alone): greedy tokens/s on a GGUF file, prefill included, exactly `new` tokens, best of `repeats`.

    python bench/llama_cpp_side.py PATH PROMPT NEW REPEATS THREADS   -> one JSON line
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path


def vm_hwm_mb() -> float:
    """This process's peak resident memory (VmHWM: per address space, so not inherited from the parent)."""
    return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def vm_rss_mb() -> float:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def measure(path: str, prompt: str, new: int, repeats: int, threads: int) -> dict:
    import llama_cpp

    start = vm_rss_mb()
    m = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                        verbose=False)
    ids = m.tokenize(prompt.encode(), add_bos=False, special=False)
    best = 0.0
    for i in range(repeats + 1):  # the first is a warm-up
        m.reset()  # no reuse of the previous run's KV cache: prefill every time, as lmforge's side does
        t = time.perf_counter()
        n = 0
        for _ in m.generate(ids, top_k=1, temp=0.0, reset=False):
            n += 1
            if n == new:
                break
        if i:
            best = max(best, n / (time.perf_counter() - t))
    return {"tok_s": best, "peak_rss_mb": vm_hwm_mb(), "rss_over_start_mb": vm_hwm_mb() - start}


if __name__ == "__main__":
    path, prompt, new, repeats, threads = sys.argv[1:6]
    print(json.dumps(measure(path, prompt, int(new), int(repeats), int(threads))), flush=True)
