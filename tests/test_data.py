"""lmforge.data: embedded corpus, document sources, char passages, token shards, batch sampling."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data import corpus, shards
from lmforge.data.corpus import TEST_WORKS, VAL_WORKS, char_passages, corpus_works, iter_documents
from lmforge.data.shard_reader import TokenShard, open_shard, read_manifest, sample_batch
from lmforge.data.shards import dtype_for, held_out_documents, prepare
from lmforge.errors import ConfigError, FormatError

ASSETS = Path(__file__).parent / "assets" / "data"


class ByteTok:
    """Test tokenizer: ids are UTF-8 bytes, EOS = 256 (the interface `prepare` relies on)."""

    eos_id: int | None = 256

    def __init__(self, vocab_size: int = 257):
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def hash(self) -> str:
        return hashlib.sha256(f"bytes-{self._vocab_size}".encode()).hexdigest()


def expected_tokens(docs: list[str], tok=None) -> np.ndarray:
    tok = tok or ByteTok()
    out: list[int] = []
    for d in docs:
        out += tok.encode(d) + [tok.eos_id]
    return np.array(out)


def read_bin(folder: Path, split: str) -> np.ndarray:
    return np.asarray(open_shard(folder, split)).astype(np.int64)


# ---- embedded corpus ---------------------------------------------------------------------------------
def test_embedded_corpus_splits():
    train, val, test = (corpus_works(s) for s in ("train", "val", "test"))
    allw = corpus_works("all")
    assert len(allw) == 42 and len(train) == 38
    assert val == sorted(VAL_WORKS) == ["julius_caesar", "twelfth_night"]
    assert test == sorted(TEST_WORKS) == ["macbeth", "tempest"]
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == allw
    assert {"hamlet", "sonnets", "lear", "rape_of_lucrece"} <= set(train)
    # the README names the held-out works
    readme = (corpus.data_root() / "shakespeare" / "README.md").read_text()
    for name in VAL_WORKS + TEST_WORKS:
        assert f"`{name}`" in readme


def test_embedded_corpus_text():
    docs = list(iter_documents("shakespeare", "val"))
    assert len(docs) == 2
    assert docs[0].startswith("JULIUS CAESAR")  # original casing kept
    hamlet = corpus.read_work("hamlet")
    assert "To be, or not to be" in hamlet
    stats = corpus.corpus_stats()
    assert stats["documents"] == 42
    assert 4_800_000 < stats["characters"] < 5_300_000
    assert stats["archive_bytes"] < 1_800_000
    for doc in iter_documents("shakespeare", "all"):
        assert "gutenberg" not in doc.lower() and "\r" not in doc
    with pytest.raises(ConfigError, match="split"):
        corpus_works("dev")


def test_char_passages_properties():
    p = char_passages("shakespeare", "val", max_chars=149)
    assert len(p) > 2000
    assert all(8 <= len(s) <= 149 for s in p)
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", s) for s in p)
    assert p == char_passages("shakespeare", "val", max_chars=149)  # deterministic
    assert any("friends romans countrymen lend me your ears" in s for s in p)
    assert not any(s.startswith("ant ") or s == "bru" for s in p)  # speaker lines are not speech
    short = char_passages("shakespeare", "test", max_chars=40)
    assert all(len(s) <= 40 for s in short) and len(short) > len(char_passages("shakespeare", "test"))


def test_char_passages_packing(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Ham.\nO, that this too too solid flesh would melt,\nThaw, and resolve itself into a dew!\n\n"
                 "[Exit.]\n\nTiny\n" + "word " * 10 + "Supercalifragilisticexpialidocious end of line\n")
    p = char_passages(str(f), max_chars=30)
    assert p == ["o that this too too solid", "flesh would melt", "thaw and resolve itself into a",
                 "dew", "word word word word word word", "word word word word end of", "line"]
    # a line that fits is never split; lines of one speech join up to the limit
    assert char_passages(str(f), max_chars=149)[0] == (
        "o that this too too solid flesh would melt thaw and resolve itself into a dew")


# ---- user sources ------------------------------------------------------------------------------------
def test_iter_documents_sources(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha doc")
    (tmp_path / "b" / "c.md").write_text("# gamma")
    (tmp_path / "b" / "d.jsonl").write_text('{"text": "d1"}\n\n{"text": "d2", "x": 1}\n')
    (tmp_path / "ignored.csv").write_text("x,y")
    assert list(iter_documents(str(tmp_path))) == ["alpha doc", "# gamma", "d1", "d2"]
    assert list(iter_documents(str(tmp_path / "a.txt"), split="val")) == ["alpha doc"]
    (tmp_path / "e.jsonl").write_text('{"body": "x"}\n')
    assert list(iter_documents(str(tmp_path / "e.jsonl"), text_field="body")) == ["x"]
    assert list(iter_documents(str(ASSETS / "tiny.jsonl"))) == ["First document.", "Second, with ünïcode.",
                                                                "Third."]


def test_bad_sources(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        list(iter_documents(str(tmp_path / "missing.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(FormatError, match=r"bad\.jsonl, line 2: invalid JSON"):
        list(iter_documents(str(bad)))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(FormatError, match=r"nofield\.jsonl, line 3: no 'text' field \(keys: content\)"):
        list(iter_documents(str(nofield)))
    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 3}\n')
    with pytest.raises(FormatError, match="not a string"):
        list(iter_documents(str(notstr)))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(FormatError, match="unsupported file type"):
        list(iter_documents(str(tmp_path / "x.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no .txt, .md or .jsonl"):
        list(iter_documents(str(tmp_path / "empty")))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FormatError, match="not UTF-8"):
        list(iter_documents(str(latin)))


# ---- prepare -----------------------------------------------------------------------------------------
def make_docs(tmp_path: Path, n: int = 40) -> tuple[Path, list[str]]:
    docs = [f"Document {i}: " + "lorem ipsum " * (i % 7) + "ünï" * (i % 3) for i in range(n)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return src, docs


def test_prepare_user_docs_counts_and_split(tmp_path):
    src, docs = make_docs(tmp_path)
    out = prepare(str(src), ByteTok(), tmp_path / "out", val_fraction=0.1, progress=False)
    m = read_manifest(out)
    held = held_out_documents(len(docs), 0.1)
    assert held and len(held) < len(docs)
    train_docs = [d for i, d in enumerate(docs) if i not in held]
    val_docs = [d for i, d in enumerate(docs) if i in held]
    np.testing.assert_array_equal(read_bin(out, "train"), expected_tokens(train_docs))
    np.testing.assert_array_equal(read_bin(out, "val"), expected_tokens(val_docs))
    total = sum(len(d.encode()) for d in docs) + len(docs)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == total
    assert m["splits"]["train"]["documents"] == len(train_docs)
    assert m["splits"]["val"]["documents"] == len(val_docs)
    assert m["tokenizer_hash"] == ByteTok().hash() and m["vocab_size"] == 257 and m["dtype"] == "uint16"
    assert m["split_mode"] == "documents" and m["source"] == str(src.resolve())
    assert m["lmforge_version"] and m["created"] and "test" not in m["splits"]
    assert not (tmp_path / "out" / "test.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_prepare_at_least_one_val_doc_and_tail_split(tmp_path):
    src, docs = make_docs(tmp_path, n=3)
    out = prepare(str(src), ByteTok(), tmp_path / "o1", progress=False)  # 0.0005 of 3 docs -> still 1
    m = read_manifest(out)
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 2
    one = tmp_path / "one.txt"
    text = "x" * 9999
    one.write_text(text)
    out = prepare(str(one), ByteTok(), tmp_path / "o2", val_fraction=0.01, progress=False)
    m = read_manifest(out)
    assert m["split_mode"] == "tail"
    assert m["splits"]["val"]["tokens"] == 100 and m["splits"]["train"]["tokens"] == 9900
    joined = np.concatenate([read_bin(out, "train"), read_bin(out, "val")])
    np.testing.assert_array_equal(joined, expected_tokens([text]))
    out = prepare(str(one), ByteTok(), tmp_path / "o3", val_fraction=0.0, progress=False)
    assert read_manifest(out)["splits"]["val"]["tokens"] == 0 and len(open_shard(out, "val")) == 0


def test_prepare_small_chunks_identical(tmp_path, monkeypatch):
    src, docs = make_docs(tmp_path)
    a = prepare(str(src), ByteTok(), tmp_path / "a", val_fraction=0.1, progress=False)
    monkeypatch.setattr(shards, "BATCH_DOCS", 3)
    monkeypatch.setattr(shards, "PIECE_CHARS", 16)  # long documents encoded in pieces
    b = prepare(str(src), ByteTok(), tmp_path / "b", val_fraction=0.1, progress=False, chunk_tokens=7)
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_bin(a, split), read_bin(b, split))
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()


def test_pieces_cut_only_between_words():
    text = "line one\nline two\n\n  indented\nlast"
    pieces = list(shards._pieces(text, limit=5))
    assert "".join(pieces) == text
    for p in pieces[:-1]:
        assert p.endswith("\n") and not p[-2].isspace()


def test_prepare_embedded_splits(tmp_path, monkeypatch):
    # two small works per split keep the test fast; the split logic is the real one
    works = {"a_play": "Enter A.\nHello there.\n", "b_poem": "Roses.\n", "julius_caesar": "Caesar!\n",
             "twelfth_night": "If music\n", "macbeth": "Double, double\n", "tempest": "Full fathom five\n"}
    monkeypatch.setattr(corpus, "_load_works", lambda: dict(sorted(works.items())))
    out = prepare("shakespeare", ByteTok(), tmp_path / "shk", progress=False)
    m = read_manifest(out)
    assert set(m["splits"]) == {"train", "val", "test"} and m["split_mode"] == "works"
    assert m["works"] == {"val": ["julius_caesar", "twelfth_night"], "test": ["macbeth", "tempest"]}
    np.testing.assert_array_equal(read_bin(out, "train"), expected_tokens([works["a_play"], works["b_poem"]]))
    np.testing.assert_array_equal(read_bin(out, "val"),
                                  expected_tokens([works["julius_caesar"], works["twelfth_night"]]))
    np.testing.assert_array_equal(read_bin(out, "test"), expected_tokens([works["macbeth"], works["tempest"]]))
    assert m["splits"]["test"]["documents"] == 2


def test_prepare_char_normalised(tmp_path):
    from lmforge.tokenizers import CharTokenizer

    tok = CharTokenizer()
    src = tmp_path / "d"
    src.mkdir()
    (src / "1.txt").write_text("To be, or NOT to be!\n")
    (src / "2.txt").write_text("Crème brûlée.")
    (src / "3.txt").write_text("1234 ...")  # nothing left after normalisation: skipped
    out = prepare(str(src), tok, tmp_path / "c", val_fraction=0.0, normalize=CharTokenizer.normalize,
                  sep_id=tok.bos_id, progress=False)
    expect = tok.encode("to be or not to be", False) + [28] + tok.encode("creme brulee", False) + [28]
    np.testing.assert_array_equal(read_bin(out, "train"), expect)
    assert read_manifest(out)["documents_skipped_empty"] == 1
    with pytest.raises(ConfigError, match="no EOS"):
        prepare(str(src), tok, tmp_path / "c2", normalize=CharTokenizer.normalize, progress=False)


def test_prepare_real_bpe_tokenizer(tmp_path):
    from lmforge.tokenizers import load_tokenizer, train_bpe

    docs = list(iter_documents("shakespeare", "test"))
    tok = train_bpe(docs, vocab_size=400)
    tok.save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    src = tmp_path / "plays"
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f"{i}.txt").write_text(d[:20000])
    out = prepare(str(src), tok, tmp_path / "bpe", val_fraction=0.3, progress=False)
    m = read_manifest(out)
    assert m["tokenizer_hash"] == tok.hash() and m["dtype"] == "uint16"
    total = sum(len(tok.encode(d[:20000], add_special_tokens=False)) + 1 for d in docs)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == total
    toks = np.concatenate([read_bin(out, "train"), read_bin(out, "val")])
    assert (toks == tok.eos_id).sum() == 2
    shard = TokenShard.open(out, "train")
    shard.check_tokenizer(tok)
    with pytest.raises(ConfigError, match="another tokenizer"):
        shard.check_tokenizer(ByteTok())


def test_dtype_choice(tmp_path):
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    src = tmp_path / "t.txt"
    src.write_text("hello world")
    out = prepare(str(src), ByteTok(vocab_size=70000), tmp_path / "big", val_fraction=0.0, progress=False)
    mm = open_shard(out, "train")
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint32
    assert (out / "train.bin").stat().st_size == 12 * 4
    np.testing.assert_array_equal(np.asarray(mm), expected_tokens(["hello world"]))


def test_prepare_bad_input_and_overwrite(tmp_path):
    tok = ByteTok()
    with pytest.raises(FormatError, match="does not exist"):
        prepare(str(tmp_path / "nope.txt"), tok, tmp_path / "o", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="no text"):
        prepare(str(empty), tok, tmp_path / "o", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(FormatError, match="line 2"):
        prepare(str(bad), tok, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(str(bad), tok, tmp_path / "o", val_fraction=1.5, progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    src, docs = make_docs(tmp_path, n=5)
    out = prepare(str(src), tok, tmp_path / "o", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare(str(src), tok, out, progress=False) == out  # same data and settings: no-op
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ConfigError, match="overwrite"):
        prepare(str(src), ByteTok(vocab_size=300), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost
    # a failing run with overwrite=True leaves the old folder intact too
    bad_src = tmp_path / "bad2.jsonl"
    bad_src.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(FormatError):
        prepare(str(bad_src), tok, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare(str(src), ByteTok(vocab_size=300), out, overwrite=True, progress=False)
    assert read_manifest(out)["vocab_size"] == 300
    # a non-empty folder that is not a prepared dataset is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        prepare(str(src), tok, other, overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_read_manifest_validates(tmp_path):
    src, _ = make_docs(tmp_path, n=4)
    out = prepare(str(src), ByteTok(), tmp_path / "o", progress=False)
    with pytest.raises(FormatError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(FormatError, match="truncated"):
        read_manifest(out)
    (out / "train.bin").unlink()
    with pytest.raises(FormatError, match="missing"):
        open_shard(out, "train")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="corrupt"):
        read_manifest(out)


# ---- batches -----------------------------------------------------------------------------------------
def test_sample_batch_determinism_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(123)
    x, y = sample_batch(tokens, 4, 16, g)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    x2, _ = sample_batch(tokens, 4, 16, torch.Generator().manual_seed(123))
    assert torch.equal(x, x2)
    # save/restore the generator state -> the same next batch (bit-identical resume)
    state = g.get_state()
    a, _ = sample_batch(tokens, 4, 16, g)
    g.set_state(state)
    b, _ = sample_batch(tokens, 4, 16, g)
    assert torch.equal(a, b) and not torch.equal(a, x)
    # the last window reaches the end of the tokens
    x, y = sample_batch(np.arange(17, dtype=np.uint16), 2, 16, torch.Generator().manual_seed(0))
    assert y[0, -1].item() == 16
    with pytest.raises(ConfigError, match="too few"):
        sample_batch(np.arange(16), 1, 16, g)


def test_token_shard_batches(tmp_path):
    src, docs = make_docs(tmp_path)
    out = prepare(str(src), ByteTok(), tmp_path / "o", val_fraction=0.1, progress=False)
    shard = TokenShard.open(out, "train")
    assert len(shard) == read_manifest(out)["splits"]["train"]["tokens"] and shard.vocab_size == 257
    x, y = shard.sample_batch(3, 8, torch.Generator().manual_seed(1))
    flat = read_bin(out, "train")
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        i = next(i for i in range(len(flat) - 8) if flat[i:i + 8].tolist() == row_x)
        assert flat[i + 1:i + 9].tolist() == row_y
    with pytest.raises(ConfigError, match="no split 'test'"):
        TokenShard.open(out, "test")


def test_cli_prepare(tmp_path, capsys):
    from lmforge.cli import main

    src = tmp_path / "t.txt"
    src.write_text("Some text for the CLI.")
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--val-fraction", "0",
                 "--no-progress"]) == 0
    assert "train 22 tokens" in capsys.readouterr().out  # char: "some text for the cli" + BOS
    assert main(["prepare", "--source", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err
