"""Fast CPU paths that prove themselves on the machine they run on, or step aside.

PyTorch's fast CPU kernels differ by CPU: `_weight_int4pack_mm_for_cpu` reads one byte layout under its
AVX-512 build, another under AVX2 and a third in its generic one; oneDNN refuses bf16 on a CPU without
AVX-512 BW/VL/DQ or AVX-NE-CONVERT; fbgemm's int8 GEMM saturates 16-bit sums on CPUs without VNNI. A CPU flag
does not say which of these hold (`ATEN_CPU_CAPABILITY` and `ONEDNN_MAX_CPU_ISA` change them on one machine),
so each fast path is *probed*: at its first use in a process it runs a small case and compares the result
with the plain reference (dequantize, then `F.linear` in fp32). The outcome, a `Choice`, is cached for the
process. A path that fails its probe (or raises) is replaced by a correct one, and the user is told once, in
one line on stderr (logger `lmforge.kernels`, level WARNING); a passing choice is logged at INFO and shown by
`lmforge env`.

The probes live beside their kernels (`lmforge.quant.linear`, `lmforge.infer.packed`, ...) and register here
with `register(path, "module:function")`, so that `lmforge env` can run them all. A probe returns a
`Choice`; `choose(path, probe)` caches it. Each probe costs well under 50 ms (`Choice.ms`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("lmforge.kernels")

# path -> "module:function" of its probe, in the order `lmforge env` shows them
PROBES: dict[str, str] = {
    "int4": "lmforge.quant.int4_layout:probe_int4",
    "int8": "lmforge.quant.int8:probe_int8",
    "int8_integer": "lmforge.quant.int8:probe_int8_integer",
    "mkl_fp32": "lmforge.infer.packed:probe_mkl_fp32",
    "onednn_fp32": "lmforge.infer.packed:probe_onednn_fp32",
    "onednn_bf16": "lmforge.infer.packed:probe_onednn_bf16",
    "blas_decode": "lmforge.infer.packed:probe_blas_decode",
}


@dataclass
class Choice:
    """What runs for one fast path on this machine, and why.

    path: the fast path's name (a key of `PROBES`, or "compiled_decode").
    kernel: what computes it now, e.g. "aten._weight_int4pack_mm_for_cpu, 32-row blocks" or
        "reference: dequantize + F.linear".
    fast: whether the fast kernel is used (it passed its probe).
    reason: why (the probe's measured error, or the error the kernel raised).
    error: relative error of the fast kernel against the reference on the probe case (None if not run).
    tolerance: the relative error the probe allowed.
    exact: the fast kernel's output equalled the reference bit for bit on the probe case.
    ms: what the probe cost.
    detail: path-specific data the caller needs (e.g. the int4 byte layout); not shown.
    """

    path: str
    kernel: str
    fast: bool
    reason: str
    error: float | None = None
    tolerance: float | None = None
    exact: bool = False
    ms: float = 0.0
    detail: Any = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """The JSON-able fields (without `detail`)."""
        d = asdict(self)
        d.pop("detail")
        return d


_CHOICES: dict[str, Choice] = {}
_LOCK = threading.RLock()


def rel_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """||fast - ref|| / ||ref|| in fp64 (inf where the fast result is not finite)."""
    fast, ref = fast.detach().double(), ref.detach().double()
    if fast.shape != ref.shape:
        return float("inf")
    if not torch.isfinite(fast).all():
        return float("inf")
    return float((fast - ref).norm() / ref.norm().clamp_min(1e-30))


def eps(dtype: torch.dtype) -> float:
    """The machine epsilon of `dtype` (2^-7 for bf16, 2^-23 for fp32)."""
    return torch.finfo(dtype).eps


def compare(path: str, fast_name: str, fast: Callable[[], torch.Tensor], ref: torch.Tensor, tolerance: float,
            fallback: str, detail: Any = None) -> Choice:
    """Run `fast()` and judge it against `ref`: a Choice for `fast_name` when the relative error is within
    `tolerance`, else for `fallback` with the error (or the exception) as the reason."""
    try:
        out = fast()
    except Exception as e:  # a kernel missing from this build or refusing this CPU
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Choice(path, fallback, False, f"{fast_name} raised {type(e).__name__}: {msg[:160]}",
                      tolerance=tolerance, detail=detail)
    err = rel_error(out, ref)
    exact = out.shape == ref.shape and bool(torch.equal(out.to(ref.dtype), ref))
    if err <= tolerance:
        return Choice(path, fast_name, True, f"probe passed: relative error {err:.2g} <= {tolerance:.2g}",
                      err, tolerance, exact, detail=detail)
    return Choice(path, fallback, False, f"{fast_name} failed its probe: relative error {err:.3g} > {tolerance:.2g}",
                  err, tolerance, exact, detail=detail)


def choose(path: str, probe: Callable[[], Choice]) -> Choice:
    """The cached Choice for `path`, probing on the first call in this process. A probe that raises counts
    as a failed one whose fallback is the reference path."""
    c = _CHOICES.get(path)
    if c is not None:
        return c
    with _LOCK:
        c = _CHOICES.get(path)
        if c is None:
            t = time.perf_counter()
            try:
                c = probe()
            except Exception as e:  # the probe itself broke: never let that break the caller
                c = Choice(path, "reference", False, f"probe raised {type(e).__name__}: {e}")
            c.ms = (time.perf_counter() - t) * 1e3
            _CHOICES[path] = c
            if c.fast:
                log.info("lmforge: %s: %s (%s)", path, c.kernel, c.reason)
            else:
                log.warning("lmforge: %s: using %s; %s", path, c.kernel, c.reason)
    return c


def probe(path: str) -> Choice:
    """The Choice for a registered path (running its probe if this process has not yet)."""
    c = _CHOICES.get(path)
    if c is not None:
        return c
    module, _, fn = PROBES[path].partition(":")
    return getattr(importlib.import_module(module), fn)()


def fast(path: str) -> bool:
    """Whether the fast kernel of a registered path passed its probe here."""
    c = _CHOICES.get(path)
    return (c if c is not None else probe(path)).fast


def probe_all() -> dict[str, Choice]:
    """Run every registered probe (cached ones are not run again); returns path -> Choice."""
    for path in PROBES:
        probe(path)
    return dict(_CHOICES)


def choices() -> dict[str, Choice]:
    """The choices made so far in this process."""
    return dict(_CHOICES)


def forget(path: str | None = None) -> None:
    """Drop the cached choice for `path` (all when None), so the next use probes again (for tests, and after
    changing the thread count or a backend flag)."""
    with _LOCK:
        if path is None:
            _CHOICES.clear()
        else:
            _CHOICES.pop(path, None)


# ---- speed decisions remembered per machine ---------------------------------------------------------------
#
# Where two correct paths differ only in speed and in rounding (MKL's or OpenBLAS's matrix-vector product), the
# faster is measured once and remembered for the machine, so that every later process takes the same path.


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.partition(":")[2].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """lmforge's cache folder: $LMFORGE_CACHE, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge."""
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmforge")
    return Path(root)


def remembered(name: str, measure: Callable[[], Any]) -> Any:
    """`measure()`'s result for this machine (CPU model, cores, threads, torch version and CPU capability, and
    `ONEDNN_MAX_CPU_ISA`): read from `cache_dir()/kernels.json` if measured before, else measured now and kept
    there (a read-only cache folder only loses the keeping)."""
    import torch

    key = "|".join([name, cpu_model(), str(os.cpu_count()), str(torch.get_num_threads()), torch.__version__,
                    torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", "")])
    path = cache_dir() / "kernels.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = cache[key] = measure()
    try:
        from lmforge.io import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(cache, indent=1).encode())
    except OSError:
        pass
    return value
