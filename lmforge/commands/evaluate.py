"""The evaluation stage's commands: `lmforge eval TASK --model M --data D` and `lmforge bench WHAT`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lmforge.data.texts import read_texts
from lmforge.errors import ConfigError

TASKS = ("perplexity",)


def eval_(task: Literal["perplexity"], model: str | None = None, data: str | None = None, split: str = "test",
          max_length: int | None = None, stride: int | None = None, max_tokens: int | None = None,
          dtype: str = "float32", text_field: str = "text", output: str | None = None) -> int:
    """Evaluate a model. Tasks: perplexity (sliding-window perplexity and bits per byte on text).

    Examples:
    lmforge eval perplexity --model smollm2 --data shakespeare:macbeth --max-length 1024 --max-tokens 20000
    lmforge eval perplexity --model runs/quickstart/model --data notes.txt

    Args:
        task: what to measure.
        model: a model folder, a .gguf file, a short name (smollm2) or preset:<name>.
        data: a .txt/.md/.jsonl file or a folder of them, "shakespeare" (the held-out works of --split) or
          "shakespeare:<work>" (e.g. shakespeare:macbeth).
        split: split of an embedded corpus: train, val, test or all.
        max_length: context window in tokens (default: the model's context).
        stride: tokens scored per forward pass (default: half the window, so each sees >= half a window).
        max_tokens: score only the first N tokens (to bound the time on a CPU).
        dtype: float32 or bfloat16.
        text_field: the JSON key holding the text in .jsonl files.
        output: also write the result as JSON to this file.
    """
    import lmforge
    from lmforge.evaluate import perplexity

    if task not in TASKS:
        raise ConfigError(f"unknown eval task {task!r}; available: {', '.join(TASKS)}")
    if model is None or data is None:
        raise ConfigError(f"lmforge eval {task} needs --model and --data")
    texts = read_texts(data, split, text_field)
    llm = lmforge.load(model, dtype=dtype)
    result = perplexity(llm, texts, max_length=max_length, stride=stride, max_tokens=max_tokens, progress=True)
    record = {"task": task, "model": model, "data": data, "dtype": dtype, **result.to_dict()}
    print(f"{model} on {data}: {result}")
    print(json.dumps(record))
    if output:
        from lmforge.io import write_json

        write_json(output, record)
    return 0


def bench(what: Literal["complexity", "moe", "decode"], out: str = "bench/results", quick: bool = False,
          d_model: int = 256, n_layer: int = 4) -> None:
    """Measure the block families against their claimed complexities, MoE routing overhead, or Mamba vs dense decode.

    Args:
        what: "complexity" (training/decode time and memory vs length, fitted exponents, PNG, and the Mamba
            vs dense decode comparison), "moe" (training tokens/s of an MoE vs the dense model with its
            active parameters) or "decode" (only Mamba's decode step vs the dense transformer of about its
            parameter count, at positions 512 and 4,096, best of 7 alternating rounds).
        out: folder for complexity.json / complexity.png / complexity.md.
        quick: fewer lengths (256..2048 training; decode at 512, 2048, 8192).
        d_model: model width of every family.
        n_layer: transformer layers (Mamba gets 2.5x as many, to match parameters).
    """
    from lmforge.evaluate.complexity import decode_vs_dense, plot, run_study, table
    from lmforge.evaluate.moe import moe_throughput, moe_vs_dense

    if what == "moe":
        moe_throughput()
        moe_vs_dense(out, steps=60 if quick else 150)
        return
    if what == "decode":
        decode_vs_dense(d_model=d_model, n_layer=n_layer)
        return
    if what != "complexity":
        raise ConfigError(f"unknown benchmark {what!r}; available: complexity, moe, decode")
    kw = {"train_lengths": (256, 512, 1024, 2048), "positions": (512, 2048, 8192)} if quick else {}
    moe = moe_throughput() if not quick else None
    study = run_study(d_model=d_model, n_layer=n_layer, **kw)
    study["decode_vs_dense"] = decode_vs_dense(d_model=d_model, n_layer=n_layer)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    study["moe"] = moe
    (folder / "complexity.json").write_text(json.dumps(study, indent=1))
    md = table(study)
    (folder / "complexity.md").write_text(md + "\n")
    plot(study, folder / "complexity.png")
    print(md)
    print(f"wrote {folder / 'complexity.json'}, {folder / 'complexity.png'}")
