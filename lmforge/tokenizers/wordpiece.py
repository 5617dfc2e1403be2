"""WordPiece (BERT) tokenizers and encoder inputs: train one, encode texts or pairs of segments into padded
batches with token types, truncate only when asked, and report unknown characters.

Any HF tokenizer.json of WordPiece kind (BERT's, all-MiniLM-L6-v2's) loads through `load_tokenizer`
as an `HFTokenizer`; `encode_for_encoder` works for any `HFTokenizer` whose post-processor adds
[CLS]/[SEP] (or <s>/</s> for RoBERTa).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import tokenizers
import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import ConfigError
from lmforge.tokenizers.hf import HFTokenizer

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# role -> (tokenizer_config.json key, usual spellings)
_ROLES = {"cls": ("cls_token", ("[CLS]", "<s>")), "sep": ("sep_token", ("[SEP]", "</s>")),
          "mask": ("mask_token", ("[MASK]", "<mask>")), "unk": ("unk_token", ("[UNK]", "<unk>")),
          "pad": ("pad_token", ("[PAD]", "<pad>"))}


def special_id(tok, role: str) -> int | None:
    """Id of the tokenizer's [CLS]/[SEP]/[MASK]/[UNK]/[PAD] token (`role` = cls, sep, mask, unk, pad), or None.

    tokenizer_config.json's `<role>_token` decides when present, else the usual spellings.
    """
    key, names = _ROLES[role]
    named = (getattr(tok, "config", None) or {}).get(key)
    if isinstance(named, dict):
        named = named.get("content")
    for name in ([named] if isinstance(named, str) else []) + list(names):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, *, lowercase: bool = True,
                    min_frequency: int = 2, special_tokens: Sequence[str] = BERT_SPECIAL_TOKENS,
                    model_max_length: int | None = 512) -> HFTokenizer:
    """Train a BERT-style WordPiece tokenizer on `texts`.

    BERT's normaliser (clean text, split CJK characters, optional lowercasing and accent stripping),
    whitespace-and-punctuation pre-tokenisation, `##` continuation pieces, and a post-processor adding
    [CLS] A [SEP] (B [SEP]) with token types 0/1. Characters never seen in training become [UNK].
    """
    specials = list(special_tokens)
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in specials]
    if missing:
        raise ConfigError(f"special_tokens must include {missing}; BERT-style inputs need [PAD] [UNK] [CLS] [SEP]")
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None if lowercase else False, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, continuing_subword_prefix="##")
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "unk_token": "[UNK]",
              "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "model_max_length": model_max_length}
    if "[MASK]" in specials:
        config["mask_token"] = "[MASK]"
    return HFTokenizer(tok, config)


@dataclass
class EncoderBatch:
    """Right-padded encoder inputs, each (B, T): ids, attention mask (1 = real) and token types."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor

    def to(self, device: str | torch.device) -> EncoderBatch:
        return EncoderBatch(self.input_ids.to(device), self.attention_mask.to(device), self.token_type_ids.to(device))


def encode_for_encoder(tok: HFTokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                       max_length: int | None = None, truncation: bool = False,
                       unknown: str = "unk") -> EncoderBatch:
    """Encode texts (or pairs of segments) for a bidirectional encoder, right-padded to the longest.

    Args:
        tok: an `HFTokenizer` whose post-processor adds [CLS]/[SEP] (BERT, MiniLM, RoBERTa).
        texts: the first segments.
        pairs: the second segments (token type 1), one per text, or None.
        max_length: longest allowed sequence in tokens, special tokens included (None: the tokenizer's
            model_max_length, if it has one).
        truncation: cut over-long inputs to max_length (the longer segment first); without it an
            over-long input is an error naming it.
        unknown: "unk" maps characters outside the vocabulary to [UNK] (as BERT does); "error" raises
            naming them.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must be a non-empty list of str")
    if pairs is not None and (len(pairs) != len(texts) or not all(isinstance(t, str) for t in pairs)):
        raise ConfigError(f"pairs must be a list of str as long as texts ({len(texts)})")
    if unknown not in ("unk", "error"):
        raise ConfigError(f"unknown must be 'unk' or 'error', got {unknown!r}")
    if not isinstance(tok, HFTokenizer):
        raise ConfigError(f"encoder inputs need a tokenizer.json-based tokenizer, got {type(tok).__name__}")
    max_length = max_length or tok.model_max_length
    inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
    backend = tok.tokenizer
    if truncation:
        if max_length is None:
            raise ConfigError("truncation=True needs max_length (the tokenizer states no model_max_length)")
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.enable_truncation(max_length, strategy="longest_first")
    try:
        encs = backend.encode_batch(inputs, add_special_tokens=True)
    except Exception as e:  # the Rust side raises a bare Exception, e.g. WordPiece without an [UNK] token
        raise ConfigError(f"cannot tokenize the input ({e}); if the vocabulary has no [UNK] token, remove the "
                          "characters it cannot spell or use a tokenizer with one") from None
    if max_length is not None and not truncation:
        for i, e in enumerate(encs):
            if len(e.ids) > max_length:
                raise ConfigError(f"input {i} is {len(e.ids)} tokens long, more than max_length {max_length}; "
                                  "shorten it, or pass truncation=True (--truncate) to cut it")
    unk = special_id(tok, "unk")
    if unknown == "error" and unk is not None:
        for i, e in enumerate(encs):
            if unk in e.ids:
                src = inputs[i] if isinstance(inputs[i], str) else " ".join(inputs[i])
                bad = [src[a:b] for t, (a, b) in zip(e.ids, e.offsets) if t == unk]
                raise ConfigError(f"input {i} has text the vocabulary cannot spell: {bad[:5]}; remove or replace "
                                  "it, or pass unknown='unk' to map it to [UNK]")
    T = max(len(e.ids) for e in encs)
    pad = special_id(tok, "pad") or 0
    ids = torch.full((len(encs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encs), T), dtype=torch.long)
    types = torch.zeros((len(encs), T), dtype=torch.long)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        types[i, :n] = torch.tensor(e.type_ids)
    return EncoderBatch(ids, mask, types)
