"""Process memory settings for CPU training: how much freed memory glibc's malloc keeps resident.

A training step frees and reallocates the same large buffers every step (activations, logits, gradients,
autocast's bf16 weight copies). glibc's malloc serves large requests with fresh `mmap`s and returns them
on `free`, so every step touches its working set as new zeroed pages: a 110M Llama step at batch 4 x 256
takes about 240,000 minor page faults, roughly a tenth of the step (bench/train.py prints the counts).
`keep_freed_memory()` tells malloc to serve everything from its heap and never trim it, so from the
second step on the same pages are reused and the fault count drops to about zero. The price is that the
resident size stays at its peak, and at the peak of the heap's fragmentation.

`bound_freed_memory()` is the middle way for runs whose point is memory (QLoRA): blocks of 2 MiB and more
are mapped on their own and returned when freed, smaller ones come from the heap, whose top is returned
past 32 MiB. Measured on SmolLM2-135M QLoRA (batch 2 x 256, 2 threads, Xeon, 2026-12-03): peak 773 MB at
3.0 s a step, against 876-902 MB at 2.4 s kept, and 640 MB at 4.4 s with every block over 64 KiB mapped.
A 1 MiB bound gave 675 MB at 4.4 s, a 3.2 MiB one 861 MB at 2.4 s: the MLP's 3 MB activations decide.

The setting is process-wide; `Trainer` applies the one `TrainConfig.allocator` names (`allocator_for`).
Nothing is changed on other C libraries, or where `LMFORGE_KEEP_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from torch import nn

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_DEFAULT_MMAP_MAX, _DEFAULT_TOP_PAD = 65536, 128 * 1024

_mode = "system"  # the setting in force: "system" (glibc's own), "keep" or "bounded"


def _libc():
    if not sys.platform.startswith("linux") or os.environ.get("LMFORGE_KEEP_MEMORY", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # musl and others: no mallopt
        return None


def allocator_mode() -> str:
    """The malloc setting this module put in force: "system" (none), "keep" or "bounded"."""
    return _mode


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap for large blocks, no trimming).

    Idempotent. Returns True when the setting is in force, False where it does not apply (not Linux/glibc,
    or turned off with the environment variable LMFORGE_KEEP_MEMORY=0).
    """
    global _mode
    if _mode == "keep":
        return True
    libc = _libc()
    if libc is None:
        return False
    ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1  # large blocks from the heap too (mmap only when the heap cannot grow)
          and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # never give the top of the heap back
          and libc.mallopt(_M_TOP_PAD, 64 << 20) == 1)  # grow the heap in 64 MiB steps
    if ok:
        _mode = "keep"
    return ok


def bound_freed_memory(mmap_threshold: int = 2 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Make glibc malloc map blocks of `mmap_threshold` bytes and more on their own (returned when freed)
    and give the heap's top back past `trim_threshold`; then hand back what the heap holds freed now.

    Idempotent; undoes `keep_freed_memory`. Returns whether the setting is in force (as that function)."""
    global _mode
    libc = _libc()
    if libc is None:
        return False
    if _mode != "bounded":
        ok = (libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
              and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1  # fixed: glibc's threshold no longer grows
              and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
              and libc.mallopt(_M_TOP_PAD, _DEFAULT_TOP_PAD) == 1)
        if not ok:
            return False
        _mode = "bounded"
    libc.malloc_trim(0)
    return True


def allocator_for(setting: str, model: nn.Module | None = None, nf4: bool | None = None) -> str:
    """The malloc setting a run gets: `setting` itself, or for "auto" "bounded" when the model holds NF4 layers
    (QLoRA, whose point is memory) and "keep" otherwise. `nf4` says so for a model not built yet; by default
    `model` is looked through."""
    if setting != "auto":
        return setting
    if nf4 is None:
        from lmforge.quant import NF4Linear

        nf4 = model is not None and any(isinstance(m, NF4Linear) for m in model.modules())
    return "bounded" if nf4 else "keep"


def apply_allocator(setting: str) -> bool:
    """Put "keep", "bounded" or "system" (leave malloc alone) in force; whether it is."""
    if setting == "keep":
        return keep_freed_memory()
    if setting == "bounded":
        return bound_freed_memory()
    return setting == "system"
