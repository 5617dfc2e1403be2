"""The environment report's command: `lmforge env`."""

from __future__ import annotations

import json as _json

from lmforge.env import collect, format_report


def env(json: bool = False) -> str:
    """Print what to paste into a bug report: CPU model and ISA flags, PyTorch's CPU capability, the oneDNN /
    MKL / OpenBLAS versions, threads, native precision, and for each fast kernel the one chosen here and
    whether its probe passed.

    Args:
        json: print the same as one JSON object.
    """
    info = collect()
    out = _json.dumps(info, indent=1) if json else format_report(info)
    print(out)
    return out
