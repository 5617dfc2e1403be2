"""Run metrics: `metrics.jsonl` (one JSON object per row), `curves.png`, and the machine's peak FLOP/s for MFU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from lmforge import kernels
from lmforge.io import atomic_write_bytes


class MetricsLog:
    """Append-only JSONL log of training and validation rows, each with a `step` and a `split`.

    On resume, `truncate_after(step)` drops rows logged after the checkpoint (and a half-written last
    line from a killed run), so the finished log reads as one uninterrupted run's.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row in the file."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # torn line from a killed writer
            if isinstance(row, dict):
                out.append(row)
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only rows with `step <= step`; rewrite the file atomically."""
        kept = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def reset(self) -> None:
        """Start an empty log (a fresh run)."""
        atomic_write_bytes(self.path, b"")

    def log(self, row: dict[str, Any]) -> None:
        """Append one row and flush it, so a killed run loses at most the line being written."""
        if self._fh is None:
            self._fh = open(self.path, "a")
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def plot_curves(rows: list[dict[str, Any]], out: str | Path, title: str = "") -> Path | None:
    """Plot train/val loss against step (and learning rate) into a PNG; None if there is nothing to plot."""
    train = [r for r in rows if r.get("split") == "train" and "loss" in r]
    val = [r for r in rows if r.get("split") == "val" and "loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.8, label="train loss")
        ax_lr.plot([r["step"] for r in train], [r.get("lr", float("nan")) for r in train], color="gray")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", ms=3, label="val loss")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# ---- peak FLOP/s, for MFU -----------------------------------------------------------------------

def _cache_file() -> Path:
    return kernels.cache_dir() / "peak_flops.json"


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 1536,
                       seconds: float = 0.4) -> float:
    """Dense matmul FLOP/s of this machine at the current thread count (n x n x n, best of a short run).

    `n` shrinks (to 256 at least) where one product would take more than a tenth of `seconds`: an
    emulated bf16 (AVX2) runs at ~1 GFLOP/s, where 1536^3 took 68 s to measure instead of ~1 s."""
    probe = min(n, 256)
    a = torch.randn(probe, probe, device=device, dtype=dtype)
    a @ a  # kernel creation
    t0 = time.perf_counter()
    a @ a
    if device != "cpu":
        torch.cuda.synchronize()
    rate = 2 * probe**3 / max(time.perf_counter() - t0, 1e-9)
    while n > probe and 2 * n**3 / rate > seconds / 10:
        n = max(probe, int(n / 1.5))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: oneDNN picks and caches its kernel
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


_PEAK: dict[str, float] = {}


def _peak_key(dtype: torch.dtype, device: str) -> str:
    """What a peak depends on: the CPU, its threads, torch, and the instruction set torch and oneDNN may
    use (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA` can hold an AVX-512 machine to AVX2)."""
    try:
        isa = str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        isa = "?"
    isa += "/" + (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "")
    return "|".join([kernels.cpu_model(), isa, str(os.cpu_count()), str(torch.get_num_threads()), torch.__version__,
                     str(device), str(dtype)])


def peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Peak matmul FLOP/s for `dtype`: measured once per process, cached on disk as the best seen.

    A benchmark that shares the CPU with other work reads low, never high, so the cache keeps the
    maximum over runs (per CPU model, instruction set, thread count and torch version) rather than the
    first measurement.
    """
    key = _peak_key(dtype, device)
    if key in _PEAK:
        return _PEAK[key]
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    best = max(float(cache.get(key, 0.0)), measure_peak_flops(dtype, device))
    if best > cache.get(key, 0.0):
        cache[key] = best
        try:
            atomic_write_bytes(path, json.dumps(cache, indent=1).encode())
        except OSError:
            pass  # read-only home: the in-process value still serves
    _PEAK[key] = best
    return best


def train_peak_flops(dtype: str, device: str = "cpu") -> float:
    """The peak to take MFU against for a run in `dtype` ("float32" or "bfloat16" autocast).

    bf16 autocast runs matmuls in bf16 and the rest (softmax, norms, the loss, optimizer) in fp32, so
    its peak is the faster of the two: where bf16 is only emulated (AVX2), a bf16 peak alone
    (~0.5 GFLOP/s at 1536^3, 2 threads) sat below what the step's fp32 parts and smaller bf16 products
    reach, and MFU read 381%."""
    fp32 = peak_flops(torch.float32, device)
    return max(fp32, peak_flops(torch.bfloat16, device)) if dtype == "bfloat16" else fp32


def mfu_ratio(flops_per_token: float | None, tokens_per_s: float, peak: float | None) -> float:
    """Model FLOPs utilization in [0, 1]: achieved FLOP/s over `peak`. A peak measured on one matmul
    shape can sit below what a mix of shapes reaches (or a configured `train.peak_flops` be too low),
    so the ratio is clamped: utilization past 100% is a mismeasured peak, not a faster machine."""
    if not flops_per_token or not peak or peak <= 0:
        return 0.0
    return min(1.0, max(0.0, flops_per_token * tokens_per_s / peak))
