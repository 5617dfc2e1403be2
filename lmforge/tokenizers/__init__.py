"""Tokenizers: teenyGPT's character vocabulary, byte-level BPE (train and load), any Hugging Face
tokenizer.json, and chat templates rendered as `transformers` renders them.

    from lmforge.tokenizers import train_bpe, load_tokenizer
    tok = train_bpe(["some text", ...], vocab_size=4096)
    tok.save("out/tok"); tok = load_tokenizer("out/tok")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
"""

from lmforge.tokenizers.base import Tokenizer
from lmforge.tokenizers.bpe import DEFAULT_SPECIAL_TOKENS, train_bpe
from lmforge.tokenizers.char import CharTokenizer
from lmforge.tokenizers.chat import CHATML_TEMPLATE, render_chat_template, validate_messages
from lmforge.tokenizers.hf import HFTokenizer
from lmforge.tokenizers.load import load_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_SPECIAL_TOKENS",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
    "train_bpe",
    "validate_messages",
]
