"""Speculative decoding: lossless greedy with either drafter, the accept/reject rule's distribution, the
cache rollback, the public entry points and bad input."""

import pytest
import torch
from helpers.tiny import tiny_llm

from lmforge import LLM, get_preset
from lmforge.errors import ConfigError
from lmforge.infer.generate import GenerationConfig, SpecStats, filter_logits, generate_ids, iter_tokens
from lmforge.infer.speculative import PromptLookup, _verify
from lmforge.loading import build
from lmforge.tokenizers import train_bpe


def _model(preset="tiny-llama", seed=0, sharpen=20.0, **over):
    m = tiny_llm(preset, seed, **over)
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return m


@pytest.fixture(scope="module")
def target():
    return _model()


def _uncached_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 99, 3, 5, 17, 99, 3, 5, 17], [8], list(range(30, 60)) + list(range(30, 45))]


@pytest.mark.parametrize("drafter", ["lookup", "self", pytest.param("other", marks=pytest.mark.slow), "lookup-gpt2"])
def test_greedy_is_identical_to_the_model_alone(drafter):
    model = _model("tiny-gpt2", vocab_size=256) if drafter == "lookup-gpt2" else _model()
    draft = {"self": model, "other": _model(seed=1)}.get(drafter)
    expected = [_uncached_greedy(model, p, 24) for p in PROMPTS]
    for k in (1, 4):
        gen = GenerationConfig(max_new_tokens=24, temperature=0, draft_tokens=k,
                               prompt_lookup=3 if drafter.startswith("lookup") else 0)
        stats = SpecStats()
        out = generate_ids(model, PROMPTS, gen, draft=draft, stats=stats)
        # the rejected drafts were rolled back: the result equals an uncached arg-max loop
        assert out == expected
        assert stats.tokens == 72
        if drafter == "self":
            assert stats.acceptance_rate == 1.0 and stats.passes < 72
        else:  # drafts were rejected, so the rollback really ran
            assert stats.accepted < stats.drafted
        if drafter.startswith("lookup"):
            assert stats.accepted > 0


def test_eos_and_length_limits_are_kept(target):
    prompt = PROMPTS[0]
    free = generate_ids(target, [prompt], GenerationConfig(max_new_tokens=30, temperature=0))[0]
    eos = free[7]
    for draft, lookup in ((None, 2), (target, 0)):
        gen = GenerationConfig(max_new_tokens=30, temperature=0, prompt_lookup=lookup, draft_tokens=6)
        assert generate_ids(target, [prompt], gen, eos_ids=[eos], draft=draft)[0] == free[:free.index(eos) + 1]
        gen = GenerationConfig(max_new_tokens=5, temperature=0, prompt_lookup=lookup, draft_tokens=6)
        assert generate_ids(target, [prompt], gen, draft=draft)[0] == free[:5]
        near_end = list(range(1, 126))  # 3 slots left of the 128-token context
        assert len(generate_ids(target, [near_end], gen, draft=draft)[0]) == 3


def test_prompt_lookup_copies_the_latest_match():
    look = PromptLookup(max_ngram=2)
    assert look.propose([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3) == ([4, 7, 1], None)  # latest "1 2", then 3 tokens
    assert look.propose([1, 2, 3, 2], 5) == ([3, 2], None)  # no "3 2" earlier: falls back to the 1-gram "2"
    assert look.propose([1, 2, 3], 4) == ([], None)


@pytest.mark.parametrize("one_hot", [False, True])
def test_accept_reject_rule_samples_the_model_distribution(one_hot):
    """The first token a verify pass emits follows p, whatever q drafted it (exact small-vocabulary check)."""
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.05, 0.6, 0.2, 0.05, 0.1]])
    p = p_logits[0].softmax(-1)
    gen = GenerationConfig(temperature=1.0)
    n, counts = 3000, torch.zeros(5)
    for _ in range(n):
        d = 1 if one_hot else int(torch.multinomial(q[0], 1, generator=g))
        kept, nxt = _verify(p_logits, [d], None if one_hot else q, gen, g)
        counts[d if kept else nxt] += 1
    freq = counts / n
    tol = 4 * (p * (1 - p) / n).sqrt() + 1e-3
    assert ((freq - p).abs() <= tol).all(), (freq, p)
    assert (freq - (q[0] if not one_hot else torch.eye(5)[1])).abs().max() > 0.2  # far from the drafter's


@pytest.mark.slow
def test_sampling_with_a_draft_model_follows_the_target():
    """Seeded frequency check end to end, vocabulary 6: the 2nd and 3rd new tokens (decided by accept/reject)
    against their exact marginals under the target alone; the draft is deliberately different."""
    cfg = dict(vocab_size=6)
    model, draft = _model(seed=3, sharpen=30.0, **cfg), _model(seed=5, sharpen=30.0, **cfg)
    prompt = [1, 2, 3]

    def probs(ctx, m=model):  # what sampling draws from: top-5 of the 6 tokens
        with torch.no_grad():
            return filter_logits(m(torch.tensor([ctx]))[0, -1:], GenerationConfig(top_k=5)).softmax(-1)[0]

    p1 = probs(prompt)
    m2 = sum(p1[a] * probs(prompt + [a]) for a in range(6))
    m3 = sum(p1[a] * probs(prompt + [a])[b] * probs(prompt + [a, b]) for a in range(6) for b in range(6))
    n = 300
    wrong = sum(p1[a] * probs(prompt + [a], draft) for a in range(6))  # the 2nd token if drafts always won
    assert (wrong - m2).abs().max() > 3 * (4 * (0.25 / n) ** 0.5 + 0.01)  # so a wrong rule would show
    counts = torch.zeros(2, 6)
    stats = SpecStats()
    for seed in range(n):
        gen = GenerationConfig(max_new_tokens=3, temperature=1.0, seed=seed, draft_tokens=2, top_k=5)
        out = generate_ids(model, [prompt], gen, draft=draft, stats=stats)[0]
        counts[0, out[1]] += 1
        counts[1, out[2]] += 1
    assert 0 < stats.acceptance_rate < 1
    for freq, exact in zip(counts / n, (m2, m3)):
        tol = 4 * (exact * (1 - exact) / n).sqrt() + 0.01
        assert ((freq - exact).abs() <= tol).all(), (freq, exact)


def test_rollback_bounds(target):
    cache = target.new_cache(1, max_len=8)
    target(torch.tensor([[1, 2, 3]]), cache=cache)
    cache.rollback(2)
    assert cache.length == 1 and int(cache.next_pos[0]) == 1
    with pytest.raises(ValueError, match="roll back"):
        cache.rollback(2)


@pytest.fixture(scope="module")
def llms():
    text = "the cat sat on the mat and the dog sat on the log; " * 30
    tok, other_tok = train_bpe([text], vocab_size=280), train_bpe([text.upper()], vocab_size=280)
    torch.manual_seed(0)
    cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size)
    big = LLM(build(cfg, None, "test"), tok)
    small = LLM(build(cfg.replace(n_layer=1), None, "test"), tok)
    alien = LLM(build(get_preset("tiny-llama").replace(vocab_size=other_tok.vocab_size), None, "test"), other_tok)
    return big, small, alien


def test_llm_generate_speculative_and_stream(llms):
    big, small, _ = llms
    prompt = "the cat sat on the mat and the dog"
    plain = big.generate(prompt, max_new_tokens=30, temperature=0)
    assert big.generate(prompt, max_new_tokens=30, temperature=0, prompt_lookup=True) == plain
    assert big.generate(prompt, max_new_tokens=30, temperature=0, draft=small, draft_tokens=3) == plain
    assert "".join(big.generate(prompt, max_new_tokens=30, temperature=0, draft=small, stream=True)) == plain
    assert big.generate([prompt, "the"], max_new_tokens=10, temperature=0, prompt_lookup=2) == \
        big.generate([prompt, "the"], max_new_tokens=10, temperature=0)


def test_bad_speculative_input(llms, target):
    big, _, alien = llms
    with pytest.raises(ConfigError, match="tokenizer.*differs"):
        big.generate("the cat", max_new_tokens=4, draft=alien)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        big.generate("the cat", max_new_tokens=4, prompt_lookup=True, repetition_penalty=1.2)
    with pytest.raises(ConfigError, match="cannot be combined"):
        big.generate("the cat", max_new_tokens=4, prompt_lookup=True, num_beams=2)
    with pytest.raises(ConfigError, match="one prompt"):
        next(iter_tokens(target, [[1], [2]], GenerationConfig(prompt_lookup=2)))
    with pytest.raises(ConfigError, match="prompt_lookup"):
        GenerationConfig(prompt_lookup=-1).validate()
    with pytest.raises(ConfigError, match="draft_tokens"):
        GenerationConfig(draft_tokens=0).validate()
    short = _model(block_size=16)
    with pytest.raises(ConfigError, match="draft model's context"):
        generate_ids(target, [[1, 2, 3]], GenerationConfig(max_new_tokens=20), draft=short)


def test_cli_beams_and_speculative(llms, tmp_path, capsys):
    from lmforge.cli import main

    big, small, alien = llms
    for name, llm in (("big", big), ("small", small), ("alien", alien)):
        llm.save(tmp_path / name)
    base = ["generate", "the cat sat", "--model", str(tmp_path / "big"), "--max-new-tokens", "12",
            "--temperature", "0", "--no-stream"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--prompt-lookup", "3"], ["--draft", str(tmp_path / "small"), "--draft-tokens", "3"]):
        assert main(base + extra) == 0
        assert capsys.readouterr().out == plain
    assert main(base + ["--num-beams", "3", "--num-return-sequences", "2", "--early-stopping", "true"]) == 0
    beams = capsys.readouterr().out.split("\n")
    assert beams[0].startswith("[1] the cat sat") and beams[1].startswith("[2] the cat sat")
    best = big.generate("the cat sat", max_new_tokens=12, num_beams=3, early_stopping=True)
    assert beams[0][4:] == "the cat sat" + best
    assert main(base + ["--draft", str(tmp_path / "alien")]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_chat_takes_the_same_decoding_options(llms):
    big, small, _ = llms
    msgs = [{"role": "user", "content": "the cat sat on the mat"}]
    plain = big.chat(msgs, max_new_tokens=12)
    assert big.chat(msgs, max_new_tokens=12, prompt_lookup=True) == plain
    assert big.chat(msgs, max_new_tokens=12, draft=small) == plain
    assert big.chat(msgs, max_new_tokens=12, num_beams=2, num_return_sequences=2)[0] == \
        big.chat(msgs, max_new_tokens=12, num_beams=2)
