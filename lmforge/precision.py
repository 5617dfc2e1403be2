"""Which precision to compute in by default: bf16 only where this CPU computes it natively, as measured.

bf16 pays on CPUs with bf16 dot products (AVX-512 BF16, AMX, Arm BF16): a matmul runs ~2x (AVX-512 BF16)
to ~10x (AMX) faster than in fp32. Elsewhere (AVX2-only x86, older AVX-512) oneDNN emulates it and a bf16
matmul runs ~20-30x *slower* than fp32 (a demo training step: 34 s instead of well under a second). So the
decision is measured, never read off a vendor or cpuinfo flag: a tiny bf16 and fp32 matmul (128 x 128,
then 192 x 192 unless bf16 is already clearly emulated; one thread, interleaved, best of a few; ~5-30 ms,
once per process) and bf16 counts as native when it
reaches `NATIVE_RATIO` of fp32's speed. Measured here (AMD EPYC, AVX-512 BF16, torch 2.13): bf16 ≈ 1.75x
fp32; with AVX2 forced (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`): ≈ 0.05x.

`LMFORGE_BF16_NATIVE=1` / `=0` skips the measurement and says yes / no.

The defaults built on it:

- `train_dtype(requested)`: "auto" (or None) -> "bfloat16" if native, else "float32" with a one-line note;
  an explicit "bfloat16" is kept, with a one-line warning that it will be slow, when not native.
- `load_dtype(requested, stored)`: what a model loads as when no dtype is asked for: as stored, except
  that bf16-stored weights load as fp32 (exactly, with a note) where bf16 is not native.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import torch

NATIVE_RATIO = 0.8  # bf16 counts as native at >= this fraction of fp32's matmul speed (native 1.3-10x, emulated <0.1x)
_N = 192  # matrix side: big enough for bf16 kernels to show their speed (at 96 even native bf16 is ~0.9x fp32)
_CLEARLY_EMULATED = 0.3  # bf16/fp32 at 128 below this: emulated, no need to look closer
_BUDGET_S = 0.02  # seconds of timed rounds at most (after one round per size); the whole takes ~5-30 ms

_MEASURED: dict[str, Any] | None = None
_SAID: set[str] = set()


class SlowPrecisionWarning(UserWarning):
    """An explicit bf16 on a CPU that only emulates it: it will run, but many times slower than fp32."""


def _best_times(n: int, budget_s: float, max_rounds: int) -> tuple[float, float, int]:
    """Best-of seconds for an n x n x n matmul in fp32 and in bf16, the two interleaved so that load hits
    both alike; after a warm-up (oneDNN creates its kernels) and at least one round, until `budget_s`."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    a32 @ b32
    a16 @ b16
    best32 = best16 = float("inf")
    rounds, t_start = 0, time.perf_counter()
    while rounds < 1 or (rounds < max_rounds and time.perf_counter() - t_start < budget_s):
        t0 = time.perf_counter()
        a32 @ b32
        t1 = time.perf_counter()
        a16 @ b16
        t2 = time.perf_counter()
        best32, best16 = min(best32, t1 - t0), min(best16, t2 - t1)
        rounds += 1
    return max(best32, 1e-9), max(best16, 1e-9), rounds


def _measure() -> dict[str, Any]:
    """fp32 and bf16 matmul GFLOP/s on one thread (no OpenMP barrier waiting on a descheduled sibling).

    First 128 x 128 (an emulated bf16 is already ~25x slower there, and costs ~1 ms a matmul rather than
    ~12 ms at 192): a clear "no" ends it. Otherwise 192 x 192 decides, where native bf16 shows its speed
    (AVX-512 BF16: 1.3x fp32 at 128, 1.75x at 192, 0.9x at 96)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    try:
        with torch.autocast("cpu", enabled=False):
            n = 128
            t32, t16, rounds = _best_times(n, _BUDGET_S / 3, 4)
            if t32 / t16 >= _CLEARLY_EMULATED:
                n = _N
                t32, t16, more = _best_times(n, _BUDGET_S * 2 / 3, 10)
                rounds += more
    finally:
        torch.set_num_threads(threads)
    flops = 2 * n**3
    fp32, bf16 = flops / t32 / 1e9, flops / t16 / 1e9
    return {"bf16_native": bf16 >= NATIVE_RATIO * fp32, "bf16_gflops": round(bf16, 1), "fp32_gflops": round(fp32, 1),
            "ratio": round(bf16 / fp32, 3), "threshold": NATIVE_RATIO, "n": n, "rounds": rounds,
            "ms": round((time.perf_counter() - t_start) * 1e3, 1), "cpu_capability": _cpu_capability(),
            "source": "measured"}


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return "unknown"


def bf16_report() -> dict[str, Any]:
    """How the bf16 decision was made, for `lmforge env`: {"bf16_native", "bf16_gflops", "fp32_gflops",
    "ratio", "threshold", "n", "rounds", "ms", "cpu_capability", "source"} (source: measured, or env when
    `LMFORGE_BF16_NATIVE` is set: read on every call). Measured once per process; a copy is returned."""
    global _MEASURED
    env = os.environ.get("LMFORGE_BF16_NATIVE", "").strip().lower()
    if env in ("1", "true", "yes", "0", "false", "no"):
        return {"bf16_native": env in ("1", "true", "yes"), "bf16_gflops": None, "fp32_gflops": None,
                "ratio": None, "threshold": NATIVE_RATIO, "cpu_capability": _cpu_capability(),
                "source": "env LMFORGE_BF16_NATIVE"}
    if _MEASURED is None:
        _MEASURED = _measure()
    return dict(_MEASURED)


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """True where bf16 computes natively (measured on the CPU; `torch.cuda.is_bf16_supported()` on a GPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    return bool(bf16_report()["bf16_native"])


def _why() -> str:
    r = bf16_report()
    if r.get("bf16_gflops") is None:
        return f"({r['source']})"
    return f"(measured: bf16 matmul {r['bf16_gflops']:g} GFLOP/s vs fp32 {r['fp32_gflops']:g})"


def _say(key: str, msg: str, warn: bool) -> None:
    """Once per process: a one-line note on stderr, or a `SlowPrecisionWarning`."""
    if key in _SAID:
        return
    _SAID.add(key)
    if warn:
        warnings.warn(msg, SlowPrecisionWarning, stacklevel=3)
    else:
        print(msg, file=sys.stderr, flush=True)


def train_dtype(requested: str | None = "auto", device: str | torch.device = "cpu", what: str = "train.dtype") -> str:
    """The training precision for `requested`: "auto"/None -> "bfloat16" where native, else "float32" (one-line
    note); "bfloat16" is kept, with a one-line warning where it is emulated; "float32" is kept."""
    if requested in (None, "auto"):
        if bf16_native(device):
            return "bfloat16"
        _say("auto", f"note: {what}: auto -> float32: this CPU has no native bf16 {_why()}", warn=False)
        return "float32"
    if requested in ("bfloat16", "bf16") and not bf16_native(device):
        _say("explicit", f"{what}: bfloat16 kept as asked, but this CPU only emulates bf16 {_why()}: expect it "
             "to run many times slower than float32 (auto or float32 avoids it)", warn=True)
        return "bfloat16"
    return "bfloat16" if requested == "bf16" else str(requested)


def load_dtype(requested: torch.dtype | None, stored: torch.dtype, device: str | torch.device = "cpu",
               what: str = "weights") -> torch.dtype:
    """The dtype floating weights stored as `stored` load as: `requested` when given (a bf16 one on an
    emulating CPU warns once); else as stored, except bf16 -> fp32 where bf16 is not native (exact; a note)."""
    if requested is not None:
        if requested == torch.bfloat16 and not bf16_native(device):
            _say("explicit-load", f"{what}: bfloat16 as asked, but this CPU only emulates bf16 {_why()}: expect "
                 "it to run many times slower than float32", warn=True)
        return requested
    if stored == torch.bfloat16 and not bf16_native(device):
        _say("auto-load", f"note: {what} are stored in bfloat16; loading them as float32, since this CPU has no "
             f"native bf16 {_why()} (dtype='bfloat16' keeps them)", warn=False)
        return torch.float32
    return stored


def _reset_for_tests(report: dict[str, Any] | None = None) -> None:
    """Forget the measurement and the notes already said (tests); `report` replaces the measurement."""
    global _MEASURED
    _MEASURED = dict(report) if report is not None else None
    _SAID.clear()
