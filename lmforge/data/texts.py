"""Texts named by a command-line argument: the one reader behind `--data`, `train-tokenizer DATA` and `--file`.

    read_texts("shakespeare", "test")              # the embedded corpus's held-out works, one string each
    read_texts("shakespeare:macbeth")              # one work of it
    read_texts("notes.jsonl", text_field="body")   # a file (or a folder of them), one document per file or line
    read_texts("sentences.txt", lines=True)        # one text per non-empty line (of a .jsonl: its "text")
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import ConfigError, FormatError


def iter_texts(data: str, split: str = "test", text_field: str = "text") -> Iterator[str]:
    """Documents named by a `--data` value, lazily: a .txt/.md/.jsonl file or a folder of them, an embedded
    corpus ("shakespeare", documents of `split`) or one work of it ("shakespeare:macbeth")."""
    from lmforge.data.corpus import corpus_works, iter_documents, read_work

    name, _, work = data.partition(":")
    if work and not Path(data).exists():
        if name != "shakespeare":
            raise ConfigError(f"--data {data!r}: only the embedded corpus 'shakespeare' has named works")
        if work not in ("train", "val", "test", "all"):
            yield read_work(work)
        else:
            yield from (read_work(w) for w in corpus_works(work))
        return
    yield from iter_documents(data, split, text_field)


def read_texts(data: str | Path, split: str = "test", text_field: str = "text", *, lines: bool = False) -> list[str]:
    """The texts named by `data` (see `iter_texts`), as a list.

    Args:
        data: a file, a folder, "shakespeare" or "shakespeare:<work>".
        split: split of an embedded corpus: train, val, test or all.
        text_field: the JSON key holding the text in .jsonl files.
        lines: `data` is one file holding one text per non-empty line (a .jsonl line: an object whose
            `text_field` is the text); FormatError names the file and line of a bad one.
    """
    if lines:
        return _file_lines(Path(data), text_field)
    return list(iter_texts(str(data), split, text_field))


def _file_lines(path: Path, text_field: str) -> list[str]:
    if not path.is_file():
        raise FormatError(f"{path}: no such file; pass a text file with one sentence per line")
    rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return rows
    out = []
    for n, ln in enumerate(rows, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{n}: not valid JSON ({e}); fix the line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise FormatError(f"{path}:{n}: expected an object with a \"{text_field}\" string")
        out.append(obj[text_field])
    return out
