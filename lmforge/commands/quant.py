"""CLI command: `lmforge quantize --method int8|int4|nf4|q8_0 --model M --out DIR` (or a .gguf file)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal


def quantize(model: str = "", out: str = "", method: Literal["int8", "int4", "nf4", "q8_0"] = "int8",
             group_size: int = 32,
             blocksize: int = 64, double_quant: bool = False, dtype: str | None = None) -> int:
    """Quantize a model's linear layers and write the quantized model (it reloads without re-quantizing).

    Examples:
    lmforge quantize --model smollm2 --method int8 --out out/smollm2-int8
    lmforge quantize --model out/my-model --method int4 --group-size 64 --out out/my-model-int4

    Args:
        model: the model to read (folder, .gguf file, short name such as smollm2, or preset:<name>).
        out: the folder to write (replaced whole if it exists).
        method: int8 (per-channel), int4 (group-wise asymmetric), nf4 (block-wise NormalFloat) or q8_0.
        group_size: int4 group size along the input: 32, 64 or 128 (must divide every layer's width).
        blocksize: NF4 block size.
        double_quant: NF4 with int8-quantised block scales.
        dtype: float dtype of what stays in float (norms, biases): float32, bfloat16 or float16.
    """
    import lmforge
    from lmforge.errors import ConfigError

    if not model or not out:
        raise ConfigError("quantize needs --model (what to read) and --out (the folder to write)")
    t0 = time.perf_counter()
    llm = lmforge.load(model, dtype=dtype, dequantize=True)  # re-quantize a GGUF from its float values
    t1 = time.perf_counter()
    q = llm.quantize(method, group_size=group_size, blocksize=blocksize, double_quant=double_quant)
    t2 = time.perf_counter()
    path = q.save(out)
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    print(f"wrote {path}: {method} ({q.config.name}), {size / 2**20:.1f} MiB "
          f"(load {t1 - t0:.1f} s, quantize {t2 - t1:.1f} s, write {time.perf_counter() - t2:.1f} s)")
    return 0
