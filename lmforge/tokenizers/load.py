"""`load_tokenizer`: a tokenizer folder or tokenizer.json file -> `CharTokenizer` or `HFTokenizer`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.errors import FormatError
from lmforge.tokenizers.base import Tokenizer
from lmforge.tokenizers.char import CharTokenizer
from lmforge.tokenizers.hf import HFTokenizer, read_config


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a folder holding tokenizer.json (and optionally tokenizer_config.json),
    or from a tokenizer.json file (a tokenizer_config.json beside it is read too).

    Returns a `CharTokenizer` for the layout `CharTokenizer.save` writes, else an `HFTokenizer`.
    Raises FormatError naming the path if a file is missing or corrupt.
    """
    path = Path(path)
    if path.is_dir():
        tok_path = path / "tokenizer.json"
        if not tok_path.is_file():
            raise FormatError(f"no tokenizer.json in {path}; point at a model or tokenizer folder, or make one "
                              "with `lmforge train-tokenizer`")
    elif path.is_file():
        tok_path = path
    else:
        raise FormatError(f"tokenizer path {path} does not exist; pass a folder holding tokenizer.json or the "
                          "file itself")
    config = read_config(tok_path.parent / "tokenizer_config.json")
    try:
        text = tok_path.read_text(encoding="utf-8")
        tok_json = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{tok_path} is not valid JSON ({e}); the file is corrupt or truncated, re-save "
                          "or re-download it") from None
    if not isinstance(tok_json, dict) or "model" not in tok_json:
        raise FormatError(f"{tok_path} is JSON but not a tokenizer.json (no 'model' entry); check the file")
    if CharTokenizer.matches(tok_json):
        mml = (config or {}).get("model_max_length")
        return CharTokenizer(chat_template=(config or {}).get("chat_template"),
                             model_max_length=mml if isinstance(mml, int) and mml < int(1e29) else None)
    return HFTokenizer.from_file(tok_path, config)
