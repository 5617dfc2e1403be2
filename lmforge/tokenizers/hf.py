"""`HFTokenizer`: a `tokenizers.Tokenizer` (a tokenizer.json) plus its tokenizer_config.json fields.

It behaves like `transformers`' fast tokenizers: same ids from `encode`, same `add_bos_token`
handling, same chat template rendering; tests check each against `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from lmforge.errors import ConfigError, FormatError
from lmforge.tokenizers.base import Tokenizer

# Names that mark a token as BOS/EOS/pad when tokenizer_config.json does not say, most specific first.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|im_end|>", "<|eot_id|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
# transformers writes this as model_max_length when a tokenizer has no limit.
_NO_LIMIT = int(1e29)
# Config keys this class owns; others are kept as they were and written back by save().
_OWN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token",
             "chat_template", "model_max_length", "tokenizer_class")


def _token_str(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: "<s>", {"content": "<s>", ...} or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise FormatError(f"special token entry {value!r} in tokenizer_config.json is neither a string nor "
                      '{"content": ...}; fix the file')


class HFTokenizer(Tokenizer):
    """Any tokenizer the `tokenizers` library can run, with bos/eos/pad and a chat template.

    Build one with `from_file`, `from_folder`, `from_bpe` or `train_bpe`, or wrap a
    `tokenizers.Tokenizer` directly with the tokenizer_config.json fields as `config`.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any] | None = None):
        config = dict(config or {})
        if tokenizer.padding is not None or tokenizer.truncation is not None:
            # As in transformers, padding and truncation happen only when a caller asks (a tokenizer.json
            # may carry settings from its last use, e.g. all-MiniLM-L6-v2's "pad everything to 128").
            tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
            tokenizer.no_padding()
            tokenizer.no_truncation()
        self._tok = tokenizer
        self.config = config  # the tokenizer_config.json fields, as given
        self._vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self._vocab.values(), default=-1) + 1
        self._specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

        def pick(key: str, names: Sequence[str]) -> str | None:
            if key in config:  # an explicit null means "none", as in transformers
                tok = _token_str(config[key])
            else:
                tok = next((n for n in names if n in self._vocab), None)
            if tok is not None and tok not in self._vocab:
                if key in ("pad_token", "unk_token"):  # transformers would grow the vocabulary; we go without
                    return None
                raise FormatError(f"tokenizer_config.json names {key}={tok!r}, which is not in tokenizer.json's "
                                  "vocabulary; fix the config or add the token")
            return tok

        self.bos_token = pick("bos_token", BOS_NAMES)
        self.eos_token = pick("eos_token", EOS_NAMES)
        self.pad_token = pick("pad_token", PAD_NAMES)
        self.unk_token = pick("unk_token", ())
        self.bos_id = None if self.bos_token is None else self._vocab[self.bos_token]
        self.eos_id = None if self.eos_token is None else self._vocab[self.eos_token]
        self.pad_id = None if self.pad_token is None else self._vocab[self.pad_token]
        self.chat_template = _chat_template_str(config.get("chat_template"))
        mml = config.get("model_max_length")
        self.model_max_length: int | None = int(mml) if isinstance(mml, int | float) and mml < _NO_LIMIT else None

        # transformers' fast tokenizers rebuild the post-processor from add_bos_token/add_eos_token when
        # the config states either one (or tokenizer.json has none); otherwise tokenizer.json's own
        # post-processor decides. Rebuilding replaces a BOS-adding template, so BOS is never added twice.
        explicit = "add_bos_token" in config or "add_eos_token" in config
        self._explicit_add_flags = explicit
        if explicit or tokenizer.post_processor is None:
            add_bos = bool(config.get("add_bos_token")) and self.bos_token is not None
            add_eos = bool(config.get("add_eos_token")) and self.eos_token is not None
            bos, eos = self.bos_token, self.eos_token
            single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
            pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
            specials = ([(bos, self.bos_id)] if add_bos else []) + ([(eos, self.eos_id)] if add_eos else [])
            # A copy, so that the caller's tokenizers.Tokenizer is left as it was.
            self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
            self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                     special_tokens=specials)
            self.add_bos_token, self.add_eos_token = add_bos, add_eos
        else:  # read what tokenizer.json's post-processor adds around an empty text
            added = self._tok.encode("").ids
            self.add_bos_token = bool(added) and added[0] == self.bos_id
            self.add_eos_token = bool(added) and added[-1] == self.eos_id and (len(added) > 1 or not self.add_bos_token)

    # ---- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, config: dict[str, Any] | None = None) -> HFTokenizer:
        """Read a tokenizer.json; `config` holds the tokenizer_config.json fields (None: guess the
        special tokens from their usual names)."""
        path = Path(path)
        if not path.is_file():
            raise FormatError(f"tokenizer file {path} does not exist; pass a tokenizer.json or the folder "
                              "holding one")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise FormatError(f"{path} is not a valid tokenizer.json ({e}); re-save or re-train the "
                              "tokenizer") from None
        return cls(tok, config)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> HFTokenizer:
        """Read `folder/tokenizer.json` and, if present, `folder/tokenizer_config.json`."""
        folder = Path(folder)
        return cls.from_file(folder / "tokenizer.json", read_config(folder / "tokenizer_config.json"))

    @classmethod
    def from_bpe(cls, vocab: dict[str, int] | list[str], merges: Sequence[str] | Sequence[tuple[str, str]],
                 *, special_tokens: Iterable[str] | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 add_bos_token: bool = False, add_eos_token: bool = False,
                 pre_tokenizer_regex: str | Sequence[str] | None = None, individual_digits: bool = False,
                 ignore_merges: bool = False, chat_template: str | None = None,
                 model_max_length: int | None = None) -> HFTokenizer:
        """A byte-level BPE tokenizer (GPT-2, SmolLM2, Llama-3, Qwen2 style) from a vocabulary and merges,
        e.g. from a GGUF file's `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`.

        Args:
            vocab: token -> id, or the tokens in id order. Tokens are spelled in GPT-2's byte-to-unicode
                alphabet ("Ġthe"), as tokenizer.json and GGUF store them.
            merges: "a b" strings or (a, b) pairs, highest priority first.
            special_tokens: tokens (already in `vocab`) matched whole in text and skipped by
                `decode(skip_special_tokens=True)`, e.g. GGUF tokens of type CONTROL.
            bos_token, eos_token, pad_token, unk_token: their strings, or None.
            add_bos_token, add_eos_token: whether `encode(add_special_tokens=True)` adds them.
            pre_tokenizer_regex: the split regex (or several, applied in turn, as llama.cpp lists them);
                None uses GPT-2's, built into the ByteLevel pre-tokenizer.
            individual_digits: split every digit into its own piece first (SmolLM2).
            ignore_merges: look whole pieces up in the vocabulary before merging (Llama-3).
            chat_template: jinja chat template, or None.
            model_max_length: context length, if known.
        """
        if isinstance(vocab, list):
            vocab = {t: i for i, t in enumerate(vocab)}
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        if any(len(p) != 2 for p in pairs):
            bad = next(m for m, p in zip(merges, pairs) if len(p) != 2)
            raise FormatError(f"BPE merge {bad!r} is not a pair of tokens ('a b'); check the merges list")
        tok = tokenizers.Tokenizer(models.BPE(vocab=dict(vocab), merges=pairs, ignore_merges=ignore_merges))
        pieces: list[pre_tokenizers.PreTokenizer] = []
        if individual_digits:
            pieces.append(pre_tokenizers.Digits(individual_digits=True))
        if pre_tokenizer_regex is None:
            pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            regexes = [pre_tokenizer_regex] if isinstance(pre_tokenizer_regex, str) else list(pre_tokenizer_regex)
            pieces += [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
            pieces.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        tok.pre_tokenizer = pieces[0] if len(pieces) == 1 else pre_tokenizers.Sequence(pieces)
        tok.decoder = decoders.ByteLevel()
        specials = list(special_tokens or [])
        specials += [t for t in (bos_token, eos_token, pad_token, unk_token) if t and t not in specials]
        missing = [t for t in specials if t not in vocab]
        if missing:
            raise FormatError(f"special tokens {missing} are not in the BPE vocabulary; check the token list")
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        config = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token,
                  "add_bos_token": add_bos_token, "add_eos_token": add_eos_token, "chat_template": chat_template,
                  "model_max_length": model_max_length}
        return cls(tok, config)

    # ---- the Tokenizer interface -------------------------------------------------------------------
    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (with the post-processor that `add_bos_token` implies)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Highest id + 1, added tokens included (transformers' `len(tokenizer)`)."""
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """Added tokens marked special, plus bos/eos/pad/unk."""
        out = dict(self._specials)
        for t in (self.bos_token, self.eos_token, self.pad_token, self.unk_token):
            if t is not None:
                out[t] = self._vocab[t]
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; see `Tokenizer.encode`."""
        if not isinstance(text, str):
            raise ConfigError(f"encode() takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads), without computing offsets."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError("encode_batch() takes a list of str")
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; byte-level BPE gives back exactly the text that was encoded."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token as the vocabulary spells it ("Ġthe" for byte-level BPE), or None."""
        return self._vocab.get(token)

    def id_to_token(self, id: int) -> str | None:
        """Token string of an id, or None if out of range."""
        return self._tok.id_to_token(id) if 0 <= id < self._vocab_size else None

    def _special_token_strings(self) -> dict[str, str]:
        names = (("bos_token", self.bos_token), ("eos_token", self.eos_token), ("unk_token", self.unk_token),
                 ("pad_token", self.pad_token))
        return {k: v for k, v in names if v is not None}

    def _to_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        config = {k: v for k, v in self.config.items() if k not in _OWN_KEYS}
        config.update({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                       "eos_token": self.eos_token, "pad_token": self.pad_token,
                       "chat_template": self.chat_template})
        if self._explicit_add_flags:
            # Written only when stated, because stating them makes transformers (and us) replace
            # tokenizer.json's post-processor: what is saved then reloads to the same tokenizer.
            config.update({"add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token})
        if self.unk_token is not None:
            config["unk_token"] = self.unk_token
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        config.setdefault("clean_up_tokenization_spaces", False)
        return json.loads(self._tok.to_str()), config


def _chat_template_str(value: Any) -> str | None:
    # Some configs hold several named templates: [{"name": "default", "template": ...}, ...].
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise FormatError("chat_template in tokenizer_config.json is neither a string nor a list with a 'default' "
                      "entry; fix the file")


def read_config(path: Path) -> dict[str, Any] | None:
    """tokenizer_config.json as a dict, None if the file does not exist; FormatError if it is corrupt."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path} must hold a JSON object, got {type(config).__name__}; fix or delete it")
    return config
