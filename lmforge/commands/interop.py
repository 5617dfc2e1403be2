"""CLI command for interop: `lmforge convert SRC DST --to hf|gguf`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from lmforge.errors import ConfigError

# --dtype spellings for each target: HF folders hold torch dtypes, GGUF files GGML types.
_HF_DTYPES = {"f32": "float32", "fp32": "float32", "float32": "float32", "f16": "float16", "fp16": "float16",
              "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
_GGUF_DTYPES = {"f32": "f32", "fp32": "f32", "float32": "f32", "f16": "f16", "fp16": "f16", "float16": "f16",
                "bf16": "bf16", "bfloat16": "bf16", "q8_0": "q8_0"}


def convert(src: str, dst: str, to: Literal["hf", "gguf"] | None = None, dtype: str | None = None,
            allow_pickle: bool = False) -> int:
    """Convert a model between formats: a model folder (lmforge or Hugging Face), a .gguf file, a short
    name (smollm2) or preset:<name> -> a Hugging Face folder or a GGUF file.

    Examples:
    lmforge convert smollm2 out/smollm2-hf --to hf
    lmforge convert out/smollm2-hf out/smollm2-q8.gguf --to gguf --dtype q8_0

    Args:
        src: the model to read.
        dst: the folder (hf) or .gguf file (gguf) to write; replaced whole if it exists.
        to: target format; default: gguf if DST ends in .gguf, else hf.
        dtype: hf: float32, bfloat16 or float16 (default: as loaded); gguf: f32, f16, bf16 or q8_0 (default f16).
        allow_pickle: read .bin/.pt weights in SRC (with weights_only=True).
    """
    import lmforge
    from lmforge.interop import gguf

    to = to or ("gguf" if dst.endswith(".gguf") else "hf")
    table = _HF_DTYPES if to == "hf" else _GGUF_DTYPES
    if dtype is not None and dtype.lower() not in table:
        raise ConfigError(f"--dtype {dtype!r} is not available for --to {to}; choose one of "
                          f"{', '.join(sorted(set(table.values())))}")
    if to == "hf" and dst.endswith(".gguf"):
        raise ConfigError(f"{dst}: --to hf writes a folder, not a .gguf file; use --to gguf or another name")
    t0 = time.perf_counter()
    llm = lmforge.load(src, allow_pickle=allow_pickle, dequantize=True)  # float types: expand GGUF blocks
    t1 = time.perf_counter()
    if to == "hf":
        from lmforge.interop import hf

        out = llm.save(dst, dtype=table[dtype.lower()] if dtype else None)
        why = hf.exportable(llm.config)
        kind = "Hugging Face folder" if why is None else f"lmforge folder (no transformers layout: {why})"
        what = f"{kind}, {table[dtype.lower()] if dtype else 'dtype as loaded'}"
    else:
        qtype = table[dtype.lower()] if dtype else "f16"
        out = gguf.save_gguf(llm, dst, qtype)
        what = f"GGUF file ({qtype})"
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) if Path(out).is_dir() \
        else Path(out).stat().st_size
    print(f"wrote {out}: {what}, {llm.config.family} {llm.model.num_params() / 1e6:.1f}M parameters, "
          f"{size / 2**20:.1f} MiB (load {t1 - t0:.1f} s, write {time.perf_counter() - t1:.1f} s)")
    return 0
