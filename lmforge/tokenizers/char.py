"""teenyGPT's character tokenizer: pad=0, 'a'..'z'=1..26, space=27, BOS=28 (29 ids).

The vocabulary is the seed's exactly (Tomczak, "LLMs", teenygpt_example): lower-case letters and
space, a pad that ends every sequence, and a BOS that starts it. There is no EOS: the seed samples a
fixed number of tokens and reads the text up to the first pad, so `eos_id` is None and `decode` stops
at the first pad.

It saves as a genuine `tokenizers` tokenizer.json (WordLevel over single characters, a per-character
`Split` pre-tokenizer, a `Fuse` decoder, a BOS post-processor and no unknown token), so `transformers`
and the `tokenizers` library read the same ids; `load_tokenizer` recognises the layout and returns a
`CharTokenizer`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from lmforge.errors import ConfigError
from lmforge.tokenizers.base import Tokenizer

PAD, BOS = "<pad>", "<bos>"
_CHARS = "abcdefghijklmnopqrstuvwxyz "
VOCAB: dict[str, int] = {PAD: 0, **{c: i + 1 for i, c in enumerate(_CHARS)}, BOS: 28}
_ID_TO_TOKEN = {i: t for t, i in VOCAB.items()}
_SPECIALS_RE = re.compile(f"({re.escape(PAD)}|{re.escape(BOS)})")
_NOT_LETTER = re.compile(r"[^a-z]+")
_SPLIT_REGEX = r"[\s\S]"  # one piece per character, whitespace included


class CharTokenizer(Tokenizer):
    """teenyGPT's 29-id character tokenizer (see the module docstring for the vocabulary).

    `encode` accepts only 'a'-'z' and space (and the literal strings "<pad>"/"<bos>"); run raw text
    through `CharTokenizer.normalize` first. With `add_special_tokens` it prepends BOS.
    """

    bos_id: int | None = VOCAB[BOS]
    eos_id: int | None = None
    pad_id: int | None = VOCAB[PAD]

    def __init__(self, chat_template: str | None = None, model_max_length: int | None = None):
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    @property
    def vocab_size(self) -> int:
        """29."""
        return len(VOCAB)

    @property
    def special_tokens(self) -> dict[str, int]:
        """{"<pad>": 0, "<bos>": 28}."""
        return {PAD: VOCAB[PAD], BOS: VOCAB[BOS]}

    @staticmethod
    def normalize(text: str) -> str:
        """Map any text into the vocabulary: lower-case, accented Latin letters to ASCII (NFKD, combining
        marks dropped), every other character to a space, runs of spaces collapsed, ends stripped.

        >>> CharTokenizer.normalize("Crème Brûlée -- 2x!")
        'creme brulee x'
        """
        decomposed = unicodedata.normalize("NFKD", text)
        letters = "".join(c for c in decomposed if not unicodedata.combining(c))
        return _NOT_LETTER.sub(" ", letters.lower()).strip()

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return [VOCAB[c] for c in text]
        except KeyError:
            pos, ch = next((i, c) for i, c in enumerate(text) if c not in VOCAB)
            raise ConfigError(
                f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the char tokenizer's "
                "vocabulary (a-z and space); pass the text through CharTokenizer.normalize() first") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` (a-z and space only), with BOS first when `add_special_tokens`."""
        if "<" in text:
            ids = []
            for i, part in enumerate(_SPECIALS_RE.split(text)):
                ids.extend([VOCAB[part]] if i % 2 else self._encode_plain(part))
        else:
            ids = self._encode_plain(text)
        return [VOCAB[BOS], *ids] if add_special_tokens else ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts."""
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. With `skip_special_tokens` (the default) it stops at the first pad, as the
        seed does, and drops BOS; without it every id is spelled out, "<pad>" and "<bos>" included."""
        ids = self._check_ids(ids)
        if not skip_special_tokens:
            return "".join(_ID_TO_TOKEN[i] for i in ids)
        out = []
        for i in ids:
            if i == self.pad_id:
                break
            if i != self.bos_id:
                out.append(_ID_TO_TOKEN[i])
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        """Id of a single character or "<pad>"/"<bos>", else None."""
        return VOCAB.get(token)

    def id_to_token(self, id: int) -> str | None:
        """Character (or "<pad>"/"<bos>") of an id, else None."""
        return _ID_TO_TOKEN.get(id)

    def _to_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        added = [{"id": VOCAB[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t in (PAD, BOS)]
        tok_json = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": _SPLIT_REGEX}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {BOS: {"id": BOS, "ids": [VOCAB[BOS]], "tokens": [BOS]}},
            },
            "decoder": {"type": "Fuse"},
            # No "<unk>" in the vocabulary: the tokenizers library then refuses unknown characters, as we do.
            "model": {"type": "WordLevel", "vocab": dict(VOCAB), "unk_token": "<unk>"},
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast", "lmforge_tokenizer": "char",
            "bos_token": BOS, "eos_token": None, "pad_token": PAD, "add_bos_token": True,
            "add_eos_token": False, "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        return tok_json, config

    @staticmethod
    def matches(tok_json: dict[str, Any], config: dict[str, Any] | None = None) -> bool:
        """True if a tokenizer.json (and config) describe this tokenizer, as `save()` writes it."""
        model = tok_json.get("model") or {}
        return model.get("type") == "WordLevel" and model.get("vocab") == VOCAB
