"""CLI command for evaluation: `lmforge eval TASK --model M --data D`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lmforge.errors import ConfigError

TASKS = ("perplexity",)


def read_texts(data: str, split: str = "test", text_field: str = "text") -> list[str]:
    """Documents named by a `--data` value: a .txt/.md/.jsonl file or a folder of them, an embedded corpus
    ("shakespeare", documents of `split`) or one work of it ("shakespeare:macbeth")."""
    from lmforge.data import corpus_works, iter_documents, read_work

    name, _, work = data.partition(":")
    if work and not Path(data).exists():
        if name != "shakespeare":
            raise ConfigError(f"--data {data!r}: only the embedded corpus 'shakespeare' has named works")
        return [read_work(work)] if work not in ("train", "val", "test", "all") else \
            [read_work(w) for w in corpus_works(work)]
    return list(iter_documents(data, split, text_field))


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
