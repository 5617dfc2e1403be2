"""Shared pieces of the side-by-side benchmarks: machine measurements, memory probes, timing, output.

Every benchmark measures the machine in the same run as the models (matmul peak, memory bandwidth),
because on a shared 2-core VM those numbers move from run to run and a ratio to a figure measured
yesterday means little.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# transformers must never reach for a hub during a benchmark
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MB = 1024 * 1024


def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads (default 2, the machine lmforge targets) and one inter-op thread."""
    n = n or 2
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work has started); harmless
        pass
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f" {f}" in flags]
    except OSError:
        isa = []
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


# ---- timing ---------------------------------------------------------------------------------------

def best_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Smallest wall time of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def summarize(xs: list[float]) -> dict[str, float]:
    """Median and best (largest) of a list of rates."""
    return {"median": statistics.median(xs), "best": max(xs)}


# ---- machine peaks --------------------------------------------------------------------------------

@torch.inference_mode()
def measure_bandwidth(gb: float = 1.0, repeats: int = 10) -> float:
    """Large-buffer read bandwidth in GB/s: `x.sum()` over a `gb`-GB fp32 tensor (far beyond any cache)."""
    x = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32)
    t = best_time(lambda: x.sum(), repeats=repeats)
    return x.numel() * 4 / t / 1e9


@torch.inference_mode()
def measure_gemv_bandwidth(dtype: torch.dtype, rows: int = 50257, cols: int = 768, repeats: int = 10) -> float:
    """GB/s of weight bytes torch's matrix-vector product streams: F.linear((1, cols), (rows, cols)).

    The shape is GPT-2's LM head, the largest single weight a decode step reads.
    """
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    t = best_time(lambda: torch.nn.functional.linear(x, w), repeats=repeats, warmup=2)
    return w.numel() * w.element_size() / t / 1e9


@torch.inference_mode()
def measure_matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n matmul: the machine's practical peak for `dtype` (the trainer's own
    measurement, `lmforge.train.metrics.measure_peak_flops`, at the benchmark's size and uncached)."""
    from lmforge.train.metrics import measure_peak_flops

    return measure_peak_flops(dtype, "cpu", n=n, seconds=1.0) / 1e9


# ---- memory ---------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def vm_hwm_mb() -> float:
    """This process's peak resident memory, MiB (VmHWM: per address space, unlike getrusage's ru_maxrss, which
    a child process inherits from its parent across fork and exec)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    import psutil

    return psutil.Process().memory_info().rss / MB


def hwm_mb() -> float:
    """This process's resident high-water mark so far (VmHWM; since the last reset by `PeakRSS`), MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


class PeakRSS:
    """Peak resident memory over a block of code, in this process.

    Linux lets a process reset its high-water mark (`echo 5 > /proc/self/clear_refs`), so both sides of a
    comparison can be measured in one process: `delta_mb` is what the block added on top of what was
    resident when it started (activations, caches, optimizer state, allocator slack), `peak_mb` the
    process's whole peak during the block (which also holds the other side's weights). Where the reset is
    not possible, the lifetime peak from getrusage is reported and `exact` is False.
    """

    def __init__(self, trim: bool = True):
        self.trim = trim

    def __enter__(self) -> PeakRSS:
        import ctypes
        import gc

        gc.collect()
        if self.trim:  # hand freed heap pages back to the OS, or a block that reuses them would show no growth
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
        self.start_mb = rss_mb()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = _status_kb("VmHWM") is not None
        except OSError:
            self.exact = False
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kb("VmHWM") if self.exact else None
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak_mb = hwm / 1024
        self.delta_mb = max(0.0, self.peak_mb - self.start_mb)


def tensor_mb(module: torch.nn.Module) -> float:
    """Bytes of a module's parameters and buffers (shared tensors once), MiB."""
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n / MB


# ---- output ---------------------------------------------------------------------------------------

def emit(record: dict[str, Any]) -> None:
    """Print one JSON line (rounded for reading) and flush, so a long run shows progress."""

    def rnd(v):
        if isinstance(v, float):
            return float(f"{v:.5g}")
        if isinstance(v, dict):
            return {k: rnd(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rnd(x) for x in v]
        return v

    print(json.dumps(rnd(record)), flush=True)


def note(msg: str) -> None:
    """A human-readable line on stderr (stdout stays pure JSON lines)."""
    print(msg, file=sys.stderr, flush=True)


def run_cases(tag: str, cases: list[str], run: Callable[[str], dict[str, Any]],
              skip: Callable[[str], str | None] = lambda name: None) -> None:
    """Run each case and emit its record (with the load average after it); `skip(name)` may return a reason
    to emit instead of running."""
    import gc

    for name in cases:
        reason = skip(name)
        if reason:
            emit({"case": name, "skipped": reason})
            continue
        note(f"[{tag}] {name} ...")
        rec = run(name)
        rec["loadavg_1m"] = os.getloadavg()[0]
        emit(rec)
        gc.collect()


def parse_cases(arg: str | None, available: list[str], default: list[str]) -> list[str]:
    """Comma-separated case names (or 'all'); an unknown name is an error that lists the known ones."""
    if not arg:
        return default
    if arg == "all":
        return available
    out = []
    for c in arg.split(","):
        c = c.strip()
        matches = [a for a in available if a == c] or [a for a in available if a.startswith(c)]
        if not matches:
            raise SystemExit(f"unknown case {c!r}; available: {', '.join(available)}")
        out += [m for m in matches if m not in out]
    return out


# ---- other processes ------------------------------------------------------------------------------

class Contention:
    """CPU that *other* (non-niced) processes used during a block, in cores (0.0 = they left this one alone).

    On a shared 2-core machine this is the first number to look at: with 2 threads, another busy
    process stalls every parallel region, and timings can be several times slower than on a quiet box.
    The benchmark's own child processes (sides run in a process each, ranks) count as its own CPU once they
    have been waited for, which `subprocess.run` and `Popen.wait` do.
    """

    def __enter__(self) -> Contention:
        import psutil

        self._me, self._sys, self._t = psutil.Process(), psutil.cpu_times(), time.perf_counter()
        self._me0 = self._own()
        return self

    def _own(self) -> float:
        t = self._me.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc) -> None:
        import psutil

        wall = time.perf_counter() - self._t
        s1 = psutil.cpu_times()
        # niced processes (`nice -n 19 ...`) yield to us and are not counted
        busy = sum(getattr(s1, f) - getattr(self._sys, f) for f in s1._fields if f not in ("idle", "iowait", "nice"))
        mine = self._own() - self._me0
        self.cores = max(0.0, (busy - mine) / wall) if wall > 0 else 0.0


def wait_quiet(max_wait_s: float, threshold: float = 0.3, window_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until other processes use under `threshold` cores; return the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        with Contention() as c:
            time.sleep(window_s)
        if c.cores < threshold:
            break
    return time.perf_counter() - t0
