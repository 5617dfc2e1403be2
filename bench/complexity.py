"""Complexity study of the block families and MoE routing overhead. The study measures Table 1 of
J. M. Tomczak's "Large Language Models" (Deep Generative Modeling blog, post 20; the table is adapted
there from Peng et al. 2024).

Same as `lmforge bench complexity` / `lmforge bench moe`; run it under the heavy lock:
    flock /tmp/lmforge-heavy.lock .venv/bin/python bench/complexity.py [--quick] [--out bench/results]
Prints one JSON line per measurement, then the Markdown table; writes complexity.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os

try:  # `python -m bench.complexity` from the repo root, or `python bench/complexity.py`
    from bench import common
except ImportError:  # pragma: no cover
    import common

from lmforge.commands.evaluate import bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="complexity", choices=["complexity", "moe", "decode"])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    common.set_threads(a.threads)
    info = common.machine_info()
    common.emit({"machine": info, "loadavg_start": os.getloadavg()})
    bench(a.what, a.out, a.quick)
    common.emit({"loadavg_end": os.getloadavg()})  # others' work on this shared machine during the run
