"""Perplexity: equal to a direct exp(mean NLL) when the text fits the window, equal to a token-by-token
computation with sliding windows, bits per byte consistent with it, and the `lmforge eval` command."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.errors import ConfigError, FormatError
from lmforge.evaluate import perplexity, sliding_nll
from lmforge.llm import LLM
from lmforge.loading import build
from lmforge.presets import get_preset
from lmforge.tokenizers import train_bpe

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake "
        "the darling buds of May, and summer's lease hath all too short a date. ") * 6


@pytest.fixture(scope="module")
def llm(tiny_llm):
    tok = train_bpe([TEXT], vocab_size=300)
    return LLM(tiny_llm("llama", vocab_size=tok.vocab_size, block_size=128, train=True), tok, "tiny")


def _direct(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()


def test_equals_direct_computation_when_text_fits(llm):
    text = TEXT[:150]
    ids = llm.tokenizer.encode(text)
    assert 10 < len(ids) <= 128
    direct = _direct(llm.model, ids)
    for stride in (128, 7, 1):  # any stride: with the whole text in the window the context is the same
        r = perplexity(llm, text, max_length=128, stride=stride)
        assert r.tokens == len(ids) - 1
        assert r.perplexity == pytest.approx(math.exp(direct / (len(ids) - 1)), rel=1e-5)
    assert r.bytes == len(text.encode()) - len(llm.tokenizer.decode(ids[:1]).encode())
    assert r.bits_per_byte == pytest.approx(direct / math.log(2) / r.bytes, rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 5), (9, 3)])
def test_sliding_window_equals_token_by_token(llm, max_length, stride):
    ids = llm.tokenizer.encode(TEXT)[:60]
    got, n = sliding_nll(llm.model, ids, max_length, stride)
    want = 0.0
    for j in range(1, len(ids)):  # target j is in chunk k; its window ends just before the chunk's last target
        t = min(1 + ((j - 1) // stride + 1) * stride, len(ids))
        b = max(0, t - 1 - max_length)
        with torch.no_grad():
            logits = llm.model(torch.tensor([ids[b:j]]))[0, -1]
        want += F.cross_entropy(logits[None], torch.tensor([ids[j]])).item()
    assert n == len(ids) - 1
    assert got == pytest.approx(want, rel=1e-5)


def test_documents_token_budget_and_bad_arguments(llm):
    r = perplexity(llm, [TEXT[:100], TEXT[100:300]], max_length=32)
    assert r.documents == 2 and r.stride == 16
    r = perplexity(llm, [TEXT, TEXT], max_length=32, max_tokens=50)
    assert r.tokens == 49 and r.documents == 1
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        perplexity(llm, TEXT, max_length=129)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(llm, TEXT, max_length=16, stride=17)
    with pytest.raises(ConfigError, match="no text"):
        perplexity(llm, ["", "a"[:0]])
    with pytest.raises(ConfigError, match="tokenizer"):
        perplexity(LLM(llm.model, None), TEXT)
    for preset, why in (("tiny-t5", "encoder-decoder"), ("tiny-bert", "bidirectional encoder")):
        cfg = get_preset(preset).replace(vocab_size=llm.tokenizer.vocab_size)
        with pytest.raises(ConfigError, match=why):
            perplexity(LLM(build(cfg, None, "test"), llm.tokenizer, preset), TEXT)


def test_eval_cli(tmp_path, llm, capsys):
    llm.save(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "r.json"
    assert main(["eval", "perplexity", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"),
                 "--max-length", "32", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "perplexity" and record["max_length"] == 32
    assert record["perplexity"] == pytest.approx(perplexity(llm, TEXT, max_length=32).perplexity, rel=1e-5)
    assert "bits/byte" in capsys.readouterr().out


def test_eval_cli_bad_input(tmp_path, llm, capsys):
    llm.save(tmp_path / "m")
    assert main(["eval", "perplexity", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--data", str(tmp_path / "nope.txt")]) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown task
        main(["eval", "bleu", "--model", "x", "--data", "y"])
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe")
    with pytest.raises(FormatError):
        from lmforge.data.texts import read_texts

        read_texts(str(tmp_path / "bad.bin"))
