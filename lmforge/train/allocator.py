"""Process memory settings for CPU training: keep freed memory instead of handing it back to the OS.

A training step frees and reallocates the same large buffers every step (activations, logits, gradients,
autocast's bf16 weight copies). glibc's malloc serves large requests with fresh `mmap`s and returns them
on `free`, so every step touches its working set as new zeroed pages: a 110M Llama step at batch 4 x 256
takes about 240,000 minor page faults, roughly a tenth of the step (bench/train.py prints the counts).
`keep_freed_memory()` tells malloc to serve everything from its heap and never trim it, so from the
second step on the same pages are reused and the fault count drops to about zero. The price is that the
resident size stays at its peak (which a training process reaches every step anyway).

The setting is process-wide; `Trainer` applies it when `TrainConfig.keep_memory` is on (the default).
It does nothing on other C libraries, or where `LMFORGE_KEEP_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap for large blocks, no trimming).

    Idempotent. Returns True when the setting is in force, False where it does not apply (not Linux/glibc,
    or turned off with the environment variable LMFORGE_KEEP_MEMORY=0).
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LMFORGE_KEEP_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(_M_MMAP_MAX, 0) == 1  # large blocks from the heap too (mmap only when the heap cannot grow)
          and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # never give the top of the heap back
          and mallopt(_M_TOP_PAD, 64 << 20) == 1)  # grow the heap in 64 MiB steps
    _applied = ok
    return ok
