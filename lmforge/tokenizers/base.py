"""The `Tokenizer` interface every lmforge tokenizer implements, and what they share: saving, hashing,
chat templates.

A tokenizer is two JSON documents, as in a Hugging Face folder: `tokenizer.json` (what the `tokenizers`
library reads) and `tokenizer_config.json` (special-token names, chat template, `add_bos_token`). Each
subclass produces both from `_to_json()`; `save()` writes them and `hash()` digests them, so a
tokenizer that survives a save/load round trip keeps its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.io import atomic_write_bytes
from lmforge.tokenizers.chat import CHATML_TEMPLATE, render_chat_template

# tokenizer_config.json keys that decide what a tokenizer does; `hash()` digests these and tokenizer.json.
_HASHED_CONFIG_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token",
                       "chat_template")


class Tokenizer(ABC):
    """Text <-> token ids, with special tokens and a chat template.

    Subclasses: `CharTokenizer` (teenyGPT's 29-symbol vocabulary) and `HFTokenizer` (anything the
    `tokenizers` library can express: byte-level BPE, SentencePiece-style BPE, WordPiece, ...).
    """

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None

    # ---- what each tokenizer implements ------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: every id is in `range(vocab_size)`."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token strings (BOS, EOS, pad, chat markers, ...) and their ids."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        `add_special_tokens` applies the tokenizer's own post-processing (a BOS for Llama-style and char
        tokenizers, nothing for GPT-2-style ones). Special-token strings written literally in `text`
        (e.g. "<|im_start|>") become their single ids.
        """

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are left out when `skip_special_tokens`."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of one token string (as the vocabulary spells it), or None if it has none."""

    @abstractmethod
    def id_to_token(self, id: int) -> str | None:
        """Token string of one id (as the vocabulary spells it), or None if out of range."""

    @abstractmethod
    def _to_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tokenizer.json, tokenizer_config.json) contents."""

    # ---- shared ------------------------------------------------------------------------------------
    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once; subclasses override it with a faster path."""
        return [self.encode(t, add_special_tokens) for t in texts]

    def _special_token_strings(self) -> dict[str, str]:
        """bos_token/eos_token/pad_token/unk_token strings, as chat templates and HF configs name them."""
        out = {}
        for name, id_ in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if id_ is not None and (tok := self.id_to_token(id_)) is not None:
                out[name] = tok
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with this tokenizer's chat template.

        The result matches `transformers`' `apply_chat_template(..., tokenize=False)`: the template sees
        `messages`, `tools`, `add_generation_prompt`, the special-token strings (`bos_token`, ...) and
        `kwargs`. A tokenizer without a template uses ChatML (`CHATML_TEMPLATE`).
        """
        template = self.chat_template or CHATML_TEMPLATE
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, **{**self._special_token_strings(), **kwargs})

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `folder` (created if needed).

        Both are Hugging Face compatible: `transformers.AutoTokenizer.from_pretrained(folder)` reads
        them. Each file is written to a temporary name and renamed, so a crash leaves no half file.
        Returns the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tok_json, config = self._to_json()
        atomic_write_bytes(folder / "tokenizer.json", json.dumps(tok_json, ensure_ascii=False, indent=2).encode())
        atomic_write_bytes(folder / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2).encode())
        return folder

    def hash(self) -> str:
        """sha256 hex digest of what decides this tokenizer's behaviour: tokenizer.json plus the special
        tokens, `add_bos_token`/`add_eos_token` and chat template of tokenizer_config.json.

        Stable across `save()`/`load_tokenizer()`; tokenized data and checkpoints record it so that a
        mismatch between a model and its data can be caught.
        """
        tok_json, config = self._to_json()
        canon = {"tokenizer": tok_json, "config": {k: config.get(k) for k in _HASHED_CONFIG_KEYS}}
        blob = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise ConfigError(f"token id {bad} is out of range for this tokenizer (vocab_size "
                              f"{self.vocab_size}); check that the model and tokenizer belong together")
        return ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")
