"""lmforge.tokenizers: char vocabulary, byte-level BPE, save/load, chat templates, parity with transformers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import processors

from lmforge.commands.tokenizer import train_tokenizer
from lmforge.errors import ConfigError, FormatError
from lmforge.tokenizers import (
    CHATML_TEMPLATE,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

ASSETS = Path(__file__).parent / "assets" / "tokenizers"
CORPUS = (ASSETS / "corpus.txt").read_text(encoding="utf-8")


def _random_text(seed: int, n: int = 400) -> str:
    # Any code point but the surrogates (which no UTF-8 string can hold).
    rng = random.Random(seed)
    pools = [(0, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randrange(lo, hi)))
    return "".join(out)


HARD_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\n  runs of     whitespace \u00a0\u2003\u3000",
    "日本語のテキストと中文文本，还有한국어.",
    "العربية من اليمين إلى اليسار مع أرقام ١٢٣",
    "family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin 👍🏽, keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0356\u036b",
    "control: \x00\x01\x07\x1b[31m\x7f\x85 end",
    "don't can't it's 12345 3.14159 x=y+1; if(a){b}",
    _random_text(0),
    _random_text(1),
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  And 3+3?\n"}],
    [{"role": "user", "content": "Bonjour 🇫🇷 <b>gras</b> & \"quotes\""},
     {"role": "assistant", "content": "Salut !"}],
]

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct (from its GGUF's tokenizer.chat_template)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Exercises what real templates use: namespace, tojson, strftime_now, raise_exception, loop controls,
# whitespace control and tools.
FEATURES_TEMPLATE = """{%- set ns = namespace(sys='') -%}
{%- for m in messages if m.role == 'system' %}{% set ns.sys = m.content %}{% endfor -%}
{{ bos_token }}[date {{ strftime_now('%Y') }}]
{% if tools %}TOOLS {{ tools | tojson }}
{% endif %}
{% if ns.sys %}SYS {{ ns.sys }}
{% endif %}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% if m.role not in ['user', 'assistant', 'tool'] %}{{ raise_exception('bad role') }}{% endif %}
    <{{ m.role }}> {{ m.content | trim }}{{ eos_token if m.role == 'assistant' else '' }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe([CORPUS], vocab_size=500, min_frequency=2)


def _hf_fast(tok: HFTokenizer, template: str | None = None):
    from transformers import PreTrainedTokenizerFast

    kw = {k: v for k, v in (("bos_token", tok.bos_token), ("eos_token", tok.eos_token),
                            ("pad_token", tok.pad_token)) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, chat_template=template,
                                   add_bos_token=tok.add_bos_token, add_eos_token=tok.add_eos_token, **kw)


# ---- char tokenizer ------------------------------------------------------------------------------
def test_char_vocab_is_the_seeds():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 29 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 28, None)
    assert [tok.token_to_id(chr(ord("a") + i)) for i in range(26)] == list(range(1, 27))
    assert tok.token_to_id(" ") == 27 and tok.id_to_token(28) == "<bos>" and tok.id_to_token(0) == "<pad>"
    assert tok.encode("abc xyz") == [28, 1, 2, 3, 27, 24, 25, 26]
    assert tok.encode("abc", add_special_tokens=False) == [1, 2, 3]
    assert tok.encode("<bos>ab<pad>", add_special_tokens=False) == [28, 1, 2, 0]
    assert tok.special_tokens == {"<pad>": 0, "<bos>": 28}


def test_char_normalize():
    n = CharTokenizer.normalize
    assert n("Crème Brûlée -- 2x!") == "creme brulee x"
    assert n("  Héllo,\tWORLD\n\nÇa va? Ærø ﬁne  ") == "hello world ca va r fine"
    assert n("Łódź İstanbul São Paulo") == "odz istanbul sao paulo"
    assert n("日本 123 ...") == ""


def test_char_round_trip_and_decode():
    tok = CharTokenizer()
    headline = CharTokenizer.normalize("Stocks Rally as Fed Holds Rates; Café Owners Cheer!")
    ids = tok.encode(headline)
    assert ids[0] == 28 and tok.decode(ids) == headline
    # teenyGPT (Tomczak, "LLMs", Deep Generative Modeling blog, teenygpt_example) reads a sampled sequence up to
    # the first pad.
    assert tok.decode([28, 8, 9, 0, 5, 5]) == "hi"
    assert tok.decode([28, 8, 9, 0], skip_special_tokens=False) == "<bos>hi<pad>"
    assert tok.encode_batch(["ab", "c"]) == [[28, 1, 2], [28, 3]]
    with pytest.raises(ConfigError, match="out of range"):
        tok.decode([3, 29])


def test_char_unknown_character_is_refused():
    with pytest.raises(ConfigError, match=r"'É'.*position 1.*normalize"):
        CharTokenizer().encode("aÉb")


def test_char_save_load_is_a_real_hf_tokenizer(tmp_path):
    tok = CharTokenizer()
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.hash() == tok.hash()
    assert load_tokenizer(tmp_path / "tokenizer.json").hash() == tok.hash()
    text = "the quick brown fox  jumps"
    # The tokenizers library and transformers read the saved file to the same ids.
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.encode(text).ids == tok.encode(text)
    assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False)
    assert raw.decode(tok.encode(text)) == text
    with pytest.raises(Exception, match="UNK|unk"):
        raw.encode("é")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(text).input_ids == tok.encode(text)
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id) == (28, 0, None)


# ---- byte-level BPE ------------------------------------------------------------------------------
def test_bpe_trains_to_the_requested_layout(bpe):
    assert bpe.vocab_size == 500
    assert bpe.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert bpe.bos_id == bpe.eos_id == bpe.pad_id == 0 and not bpe.add_bos_token
    assert bpe.chat_template == CHATML_TEMPLATE
    # Common words of the corpus became single tokens.
    assert len(bpe.encode(" the", add_special_tokens=False)) == 1
    assert len(bpe.encode(CORPUS)) < len(CORPUS) / 2


@pytest.mark.parametrize("text", HARD_TEXTS, ids=range(len(HARD_TEXTS)))
def test_bpe_round_trips_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_round_trips_random_codepoints(bpe):
    for seed in range(2, 12):
        text = _random_text(seed, 300)
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode_batch(HARD_TEXTS) == [bpe.encode(t) for t in HARD_TEXTS]


def test_bpe_save_load_same_ids_and_hash(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, HFTokenizer)
    assert back.hash() == bpe.hash() and len(bpe.hash()) == 64
    assert back.encode_batch(HARD_TEXTS) == bpe.encode_batch(HARD_TEXTS)
    assert (back.bos_id, back.eos_id, back.pad_id, back.chat_template) == (0, 0, 0, CHATML_TEMPLATE)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["add_bos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # A second save/load changes nothing; a different template changes the hash.
    back.save(tmp_path / "tok2")
    assert load_tokenizer(tmp_path / "tok2").hash() == bpe.hash()
    assert HFTokenizer(bpe.tokenizer, {**config, "chat_template": "{{ 1 }}"}).hash() != bpe.hash()


def test_special_tokens_in_text_are_single_ids(bpe):
    text = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"
    ids = bpe.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1 and ids[-1] == 0
    assert bpe.decode(ids, skip_special_tokens=False) == text
    assert bpe.decode(ids) == "user\nHi\n"


def test_train_bpe_from_files_and_bad_arguments(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(CORPUS, encoding="utf-8")
    tok = train_bpe([f], vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], bos_token="<s>",
                    eos_token="</s>", pad_token="<pad>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.decode(tok.encode(CORPUS)) == CORPUS
    with pytest.raises(ConfigError, match="at least 259"):
        train_bpe([CORPUS], vocab_size=100)
    with pytest.raises(ConfigError, match="no text"):
        train_bpe([], vocab_size=300)
    with pytest.raises(FormatError, match="does not exist"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)


def test_encode_parity_with_transformers(bpe):
    hf = _hf_fast(bpe)
    for text in [*HARD_TEXTS, CORPUS, "<|im_start|>user\nhi<|im_end|>"]:
        assert hf(text).input_ids == bpe.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == bpe.encode(text, add_special_tokens=False)


def test_add_bos_token_like_transformers(bpe, tmp_path):
    # Llama-style: BOS added by the post-processor that add_bos_token implies, once.
    j = json.loads(bpe.tokenizer.to_str())
    llama = HFTokenizer.from_bpe(j["model"]["vocab"], j["model"]["merges"], special_tokens=DEFAULTS,
                                 bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos_token=True)
    assert llama.add_bos_token
    assert llama.encode("river") == [1, *llama.encode("river", add_special_tokens=False)]
    assert _hf_fast(llama)("river bank").input_ids == llama.encode("river bank")
    # tokenizer.json already adds BOS and the config says add_bos_token: still one BOS, as transformers.
    raw = tokenizers.Tokenizer.from_str(bpe.tokenizer.to_str())
    raw.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                       special_tokens=[("<|im_start|>", 1)])
    raw.save(str(tmp_path / "tokenizer.json"))
    bos_entry = {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False, "special": True}  # as older transformers write it
    for cfg in ({"bos_token": bos_entry, "add_bos_token": True}, None):
        if cfg is not None:
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok = load_tokenizer(tmp_path)
        assert tok.encode("river").count(1) == 1 and tok.encode("river")[0] == 1
        assert load_tokenizer(tok.save(tmp_path / "resaved")).hash() == tok.hash()
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(str(tmp_path))("river").input_ids == tok.encode("river")
        (tmp_path / "tokenizer_config.json").unlink(missing_ok=True)


DEFAULTS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_from_bpe_rebuilds_the_same_tokenizer(bpe):
    j = json.loads(bpe.tokenizer.to_str())
    vocab = sorted(j["model"]["vocab"], key=j["model"]["vocab"].get)  # tokens in id order, as GGUF stores them
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    rebuilt = HFTokenizer.from_bpe(vocab, merges, special_tokens=DEFAULTS, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert rebuilt.encode_batch(HARD_TEXTS + [CORPUS]) == bpe.encode_batch(HARD_TEXTS + [CORPUS])
    # An explicit GPT-2 regex (as a GGUF importer passes it) splits the same way.
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    explicit = HFTokenizer.from_bpe(vocab, merges, special_tokens=DEFAULTS, pre_tokenizer_regex=gpt2)
    assert explicit.encode_batch(HARD_TEXTS) == bpe.encode_batch(HARD_TEXTS)
    with pytest.raises(FormatError, match="not in the BPE vocabulary"):
        HFTokenizer.from_bpe(vocab, merges, special_tokens=["<nope>"])


# ---- chat templates ------------------------------------------------------------------------------
def test_chatml_exact_string(bpe):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert bpe.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert bpe.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    # ChatML markers are single tokens of the trained tokenizer.
    ids = bpe.encode(bpe.apply_chat_template(msgs))
    assert ids.count(1) == 3 and ids.count(2) == 2
    # A tokenizer without a template uses ChatML.
    assert CharTokenizer().apply_chat_template(msgs) == bpe.apply_chat_template(msgs)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE, FEATURES_TEMPLATE],
                         ids=["chatml", "smollm2", "llama3", "features"])
def test_chat_template_parity_with_transformers(bpe, template):
    tok = HFTokenizer(bpe.tokenizer, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                      "chat_template": template})
    hf = _hf_fast(tok, template)
    tools = [{"type": "function", "function": {"name": "add", "description": "Add <two> numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for conv in CONVERSATIONS:
        for gen in (True, False):
            for t in (None, tools):
                ours = tok.apply_chat_template(conv, add_generation_prompt=gen, tools=t)
                theirs = hf.apply_chat_template(conv, add_generation_prompt=gen, tools=t, tokenize=False)
                assert ours == theirs


def test_malformed_messages_are_refused(bpe):
    bad = [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], "message 0 must be a dict"),
        ([{"role": "robot", "content": "x"}], "role 'robot'.*system, user, assistant, tool"),
        ([{"role": "user"}], "needs a str 'content'.*no content"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], "message 1 .*got int"),
    ]
    for messages, match in bad:
        with pytest.raises(ConfigError, match=match):
            bpe.apply_chat_template(messages)
    tok = HFTokenizer(bpe.tokenizer, {"chat_template": "{{ raise_exception('only user turns') }}"})
    with pytest.raises(ConfigError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = HFTokenizer(bpe.tokenizer, {"chat_template": "{% for %}"})
    with pytest.raises(ConfigError, match="syntax error"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    # The sandbox keeps templates away from Python internals.
    tok = HFTokenizer(bpe.tokenizer, {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ConfigError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# ---- loading errors and the CLI ------------------------------------------------------------------
def test_load_errors_name_the_path(bpe, tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FormatError, match=f"no tokenizer.json in {tmp_path}"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text(bpe.tokenizer.to_str()[:500])
    with pytest.raises(FormatError, match="tokenizer.json is not valid JSON.*corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(FormatError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(FormatError, match="eos_token='<|nope|>'"):
        load_tokenizer(tmp_path)


def test_special_tokens_from_config_dicts_and_names(bpe):
    tok = HFTokenizer(bpe.tokenizer, {"bos_token": {"content": "<|im_start|>", "lstrip": False},
                                      "eos_token": {"content": "<|im_end|>"}, "pad_token": None})
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    guessed = HFTokenizer(bpe.tokenizer)  # no config: the usual names
    assert (guessed.bos_id, guessed.eos_id) == (0, 0)
    assert guessed.id_to_token(0) == "<|endoftext|>" and guessed.id_to_token(10**6) is None


def test_train_tokenizer_command(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text(CORPUS[:1500], encoding="utf-8")
    (tmp_path / "docs" / "sub" / "b.md").write_text(CORPUS[1500:], encoding="utf-8")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\xff\xfe")
    rows = [json.dumps({"text": line}) for line in CORPUS.splitlines() if line]
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["train-tokenizer", str(tmp_path / "docs"), str(tmp_path / "c.jsonl"), "--out", str(out),
                 "--vocab-size", "500"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("trained byte-level BPE: vocab 500 from") and "\n" not in line
    tok = load_tokenizer(out)
    assert tok.vocab_size == 500 and tok.decode(tok.encode(CORPUS)) == CORPUS
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl.*line 1.*text"):
        train_tokenizer([str(tmp_path / "bad.jsonl")], str(out))
    assert main(["train-tokenizer", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
