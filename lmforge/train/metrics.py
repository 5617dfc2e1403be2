"""Run metrics: `metrics.jsonl` (one JSON object per row), `curves.png`, and the machine's peak FLOP/s for MFU."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

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
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "lmforge")
    return Path(root) / "peak_flops.json"


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 1536,
                       seconds: float = 0.4) -> float:
    """Dense matmul FLOP/s of this machine at the current thread count (n x n x n, best of a short run)."""
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


def peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Peak matmul FLOP/s for `dtype`: measured once per process, cached on disk as the best seen.

    A benchmark that shares the CPU with other work reads low, never high, so the cache keeps the
    maximum over runs (per CPU, thread count and torch version) rather than the first measurement.
    """
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.get_num_threads()}|" \
          f"{torch.__version__}|{device}|{dtype}"
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
