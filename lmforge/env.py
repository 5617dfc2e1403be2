"""What a user pastes into a bug report (`lmforge env` prints it): `collect` gathers it, `format_report` words it.

Modelled on `python -m torch.utils.collect_env` and `transformers env`: the CPU (model, ISA flags), PyTorch's
CPU capability and libraries (oneDNN, MKL, OpenBLAS), threads, the precision this machine computes natively,
and for each fast kernel what was chosen here and whether its probe passed (`lmforge.kernels`).
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from typing import Any

# ISA features that decide which kernels run; x86 names as /proc/cpuinfo spells them, then ARM's
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx_ne_convert", "avx512f", "avx512dq", "avx512bw",
             "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")
ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "LMFORGE_BLAS_DECODE")


def cpu_info() -> dict[str, Any]:
    """CPU model, vendor, the ISA flags of `ISA_FLAGS` it has, and the cores this process may use."""
    from lmforge.kernels import cpu_model

    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "CPU implementer") and not vendor:
                    vendor = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    return {"model": cpu_model(), "vendor": vendor, "machine": platform.machine(), "cores": cores,
            "isa": [f for f in ISA_FLAGS if f in flags]}


def torch_info() -> dict[str, Any]:
    """PyTorch's version, CPU capability, math libraries and thread counts."""
    import torch

    config = torch.__config__.show()

    def version(pattern: str) -> str | None:
        m = re.search(pattern, config)
        return m.group(1) if m else None

    return {
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "onednn": version(r"MKL-DNN (v[\d.]+)") if torch.backends.mkldnn.is_available() else None,
        "mkl": version(r"Math Kernel Library Version ([\w.\-]+)") if torch.backends.mkl.is_available() else None,
        "fbgemm": "fbgemm" in torch.backends.quantized.supported_engines,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def blas_info() -> dict[str, Any]:
    """numpy's version and its BLAS (OpenBLAS's version, kernel and threads, via threadpoolctl)."""
    import numpy as np

    out: dict[str, Any] = {"numpy": np.__version__, "blas": None}
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
                out["blas"] = {k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                break
    except Exception:  # pragma: no cover - threadpoolctl missing or broken
        pass
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    """Everything `lmforge env` prints, as one JSON-able dict (the probes run here if not yet)."""
    from lmforge import kernels
    from lmforge.precision import bf16_report

    return {
        "lmforge": _version("lmforge"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "torch": torch_info(),
        "numpy": blas_info(),
        "transformers": _version("transformers"),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "precision": bf16_report(),
        "kernels": {path: c.as_dict() for path, c in kernels.probe_all().items()},
        "fp32_decode": _decode_choice(),
    }


def _decode_choice() -> dict[str, Any]:
    """Which BLAS multiplies fp32 decode steps here, and the timings (measured once per machine) behind it."""
    import torch

    from lmforge import kernels
    from lmforge.infer import packed

    timing = kernels.remembered("gemv_fp32", packed._time_gemv)
    blas = packed.blas_decode_helps(torch.zeros(1, 1))
    return {**timing, "blas": "OpenBLAS (blas_decode)" if blas else "PyTorch's own"}


def format_report(info: dict[str, Any]) -> str:
    """The human-readable form of `collect()`'s dict."""
    cpu, t, blas = info["cpu"], info["torch"], info["numpy"]["blas"] or {}
    lines = [
        f"- lmforge: {info['lmforge']}",
        f"- Python: {info['python']}",
        f"- Platform: {info['platform']}",
        f"- CPU: {cpu['model']} ({cpu['vendor'] or cpu['machine']}), {cpu['cores']} cores",
        f"- CPU ISA: {' '.join(cpu['isa']) or 'none of the listed'}",
        f"- PyTorch: {t['version']}, CPU capability {t['cpu_capability']}, {t['threads']} threads "
        f"({t['interop_threads']} inter-op)",
        f"- oneDNN: {t['onednn']}; MKL: {t['mkl']}; fbgemm: {'yes' if t['fbgemm'] else 'no'}; CUDA: {t['cuda']}",
        f"- numpy: {info['numpy']['numpy']}; BLAS: {blas.get('internal_api')} {blas.get('version')} "
        f"({blas.get('architecture')}, {blas.get('num_threads')} threads)",
        f"- transformers: {info['transformers']}",
        f"- Environment: {' '.join(f'{k}={v}' for k, v in info['env'].items()) or '(none of the CPU variables set)'}",
    ]
    p = info["precision"]
    lines.append("- Precision: " + ", ".join(f"{k}={v}" for k, v in p.items()))
    d = info["fp32_decode"]
    lines.append(f"- fp32 decode BLAS: {d['blas']} (one row x 6 MB: PyTorch {d['torch_us']} us, "
                 f"OpenBLAS {d['openblas_us']} us)")
    lines.append("- Kernels (fast path: what runs here, and why):")
    width = max(len(k) for k in info["kernels"]) if info["kernels"] else 0
    for path, c in info["kernels"].items():
        mark = "ok  " if c["fast"] else "FALLBACK"
        lines.append(f"    {path:<{width}}  {mark:8s} {c['kernel']}: {c['reason']} ({c['ms']:.1f} ms)")
    return "\n".join(lines)
