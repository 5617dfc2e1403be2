"""The public interface: lmforge.load, LLM.generate/chat/save, and the CLI."""

import json
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge import LLM
from lmforge.errors import ConfigError, FormatError
from lmforge.tokenizers import train_bpe

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife. However little known the feelings or views of such a man may be on his first "
        "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 20


@pytest.fixture(scope="module")
def bpe_llm(tiny_llm):
    tok = train_bpe([TEXT], vocab_size=300)
    return LLM(tiny_llm("llama", vocab_size=tok.vocab_size, train=True), tok)


def test_preset_load_and_generate_teenygpt():
    llm = lmforge.load("preset:teenygpt")
    assert llm.model.num_params() == 1_089_181
    out = llm.generate("to be or not", max_new_tokens=20, temperature=1.0, seed=0)
    assert isinstance(out, str) and set(out) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert out == llm.generate("To be, or NOT", max_new_tokens=20, temperature=1.0, seed=0)  # normalised


def test_save_load_round_trip_is_exact_native_layout(tmp_path):
    llm = lmforge.load("preset:teenygpt")
    llm.save(tmp_path / "m")
    back = lmforge.load(tmp_path / "m")
    a, b = llm.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.config == llm.config
    assert back.tokenizer.hash() == llm.tokenizer.hash()
    assert json.loads((tmp_path / "m" / "lmforge.json").read_text())["weights_layout"] == "native"


def test_save_load_round_trip_is_exact_hf_layout(tmp_path, bpe_llm):
    bpe_llm.save(tmp_path / "m")
    back = lmforge.load(tmp_path / "m")
    a, b = bpe_llm.model.state_dict(), back.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    kw = dict(max_new_tokens=12, temperature=0.9, seed=3)
    assert back.generate("a single man", **kw) == bpe_llm.generate("a single man", **kw)


def test_save_over_an_existing_folder_replaces_it_whole(tmp_path, bpe_llm):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("old")
    bpe_llm.save(tmp_path / "m")
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_batch_streaming_and_stop_strings(bpe_llm):
    kw = dict(max_new_tokens=16, temperature=0.0)
    one = bpe_llm.generate("a single man", **kw)
    two = bpe_llm.generate("in want of a wife", **kw)
    assert bpe_llm.generate(["a single man", "in want of a wife"], **kw) == [one, two]
    assert "".join(bpe_llm.generate("a single man", stream=True, **kw)) == one
    if len(one) > 4:
        stop = one[2:4]
        cut = bpe_llm.generate("a single man", stop=stop, **kw)
        assert cut == one[:one.index(stop)]


def test_chat_renders_template_and_replies(bpe_llm):
    reply = bpe_llm.chat([{"role": "user", "content": "Hello"}], max_new_tokens=8)
    assert isinstance(reply, str)
    with pytest.raises(ConfigError):
        bpe_llm.chat([{"role": "robot", "content": "Hello"}])


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean"):
        lmforge.load("preset:teenygtp")
    with pytest.raises(FormatError, match="no such file"):
        lmforge.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not a model folder"):
        lmforge.load(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no tokenizer"):
        lmforge.load("preset:tiny-gpt2").generate("hi")
    with pytest.raises(ConfigError, match="dtype"):
        lmforge.load("preset:tiny-gpt2", dtype="float8")


def test_tokenizer_larger_than_the_model_is_refused(bpe_llm):
    with pytest.raises(ConfigError, match="vocabulary"):
        LLM(lmforge.load("preset:tiny-gpt2").model, train_bpe([TEXT], vocab_size=300))


def test_empty_prompt(bpe_llm):
    with pytest.raises(ConfigError, match="empty prompt"):
        bpe_llm.generate("", max_new_tokens=4)
    # teenyGPT's tokenizer starts every sequence with BOS: an empty prompt is unconditional sampling
    out = lmforge.load("preset:teenygpt").generate("", max_new_tokens=5, seed=0)
    assert isinstance(out, str)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_generate_and_help(tmp_path):
    lmforge.load("preset:teenygpt").save(tmp_path / "m")
    r = _cli("generate", "hello", "--model", str(tmp_path / "m"), "--max-new-tokens", "10", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello")
    assert _cli("--help").returncode == 0
    h = _cli("generate", "--help")
    assert h.returncode == 0 and "--top-p" in h.stdout
    bad = _cli("generate", "hi", "--model", str(tmp_path / "m"), "--top-p", "2")
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr
