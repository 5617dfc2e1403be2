"""Train a byte-level BPE tokenizer (GPT-2's scheme) with the `tokenizers` library.

Byte-level means the base alphabet is the 256 bytes, each spelled as a printable character, and text
is split with GPT-2's regex before merging; every Unicode string (CJK, emoji, control characters)
therefore encodes and decodes back exactly, with no unknown token and no normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import ConfigError, FormatError
from lmforge.tokenizers.chat import CHATML_TEMPLATE
from lmforge.tokenizers.hf import HFTokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
_CHUNK_CHARS = 1 << 20  # files are fed to the trainer in ~1 MB pieces cut at line ends


def _iter_file(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            buf: list[str] = []
            size = 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= _CHUNK_CHARS:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)
    except FileNotFoundError:
        raise FormatError(f"training file {path} does not exist; check the path") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"training file {path} is not UTF-8 text ({e}); convert it or leave it out") from None


def _iter_texts(texts_or_files: Iterable[str | Path]) -> Iterator[str]:
    for item in texts_or_files:
        if isinstance(item, Path):
            yield from _iter_file(item)
        elif isinstance(item, str):
            yield item
        else:
            raise ConfigError(f"train_bpe takes documents (str) or file paths (pathlib.Path), got "
                              f"{type(item).__name__}")


def train_bpe(texts_or_files: Iterable[str] | list[Path], vocab_size: int,
              special_tokens: list[str] | None = None, min_frequency: int = 2,
              chat_template: str | None = CHATML_TEMPLATE, show_progress: bool = False,
              bos_token: str | None = None, eos_token: str | None = None,
              pad_token: str | None = None) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on documents (str) or text files (`pathlib.Path`).

    Special tokens take the first ids, then the 256 byte symbols, then the merges, up to `vocab_size`
    (fewer if the corpus runs out of pairs seen `min_frequency` times). The default special tokens are
    `<|endoftext|>` (BOS, EOS and pad unless `bos_token`/`eos_token`/`pad_token` say otherwise),
    `<|im_start|>` and `<|im_end|>` (ChatML). Like GPT-2, `encode` adds no BOS; put `eos_id` between
    documents when packing them.
    """
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials) or not all(isinstance(t, str) and t for t in specials):
        raise ConfigError(f"special_tokens must be distinct non-empty strings, got {specials}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ConfigError(f"vocab_size {vocab_size} is too small: byte-level BPE needs the 256 bytes plus "
                          f"{len(specials)} special tokens; use at least {len(alphabet) + len(specials)}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")
    default = ENDOFTEXT if ENDOFTEXT in specials else None
    bos, eos, pad = (t if t is not None else default for t in (bos_token, eos_token, pad_token))
    for name, t in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)):
        if t is not None and t not in specials:
            raise ConfigError(f"{name} {t!r} is not among special_tokens {specials}; add it there")

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=show_progress)
    n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_chars
        for text in _iter_texts(texts_or_files):
            n_chars += len(text)
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_chars == 0:
        raise ConfigError("train_bpe got no text: the documents or files are empty")
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "add_bos_token": False,
              "add_eos_token": False, "chat_template": chat_template}
    return HFTokenizer(tok, config)
