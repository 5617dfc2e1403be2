"""The opt-in compiled decode step (`generate(..., compile=True)`): same tokens as eager decoding, logits
close to the eager step, one compilation reused across lengths, and clear errors where it does not apply."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.compiled import compiled_decode
from lmforge.infer.generate import GenerationConfig, generate_ids


@pytest.fixture(scope="module")
def model(tiny_llm):
    m = tiny_llm("llama")
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # clear argmax margins, so rounding differences cannot flip a token
    return m


@pytest.mark.slow
def test_compiled_decode_matches_eager_and_compiles_once(model):
    prompts = [[5, 17, 99, 3], [8, 1, 2]]
    eager = GenerationConfig(max_new_tokens=12, temperature=0)
    compiled = GenerationConfig(max_new_tokens=12, temperature=0, compile=True)
    ref = generate_ids(model, prompts[:1], eager)
    assert generate_ids(model, prompts[:1], compiled) == ref
    step = compiled_decode(model)
    assert step.compile_seconds > 0
    first = step.compile_seconds
    # another prompt length and number of new tokens: the cache length is symbolic, so no new compilation
    longer = GenerationConfig(max_new_tokens=20, temperature=0, compile=True)
    assert generate_ids(model, prompts[1:], longer) == generate_ids(model, prompts[1:], eager.__class__(
        max_new_tokens=20, temperature=0))
    assert step.compile_seconds == first

    # the compiled step's logits against the eager forward on the same cache contents
    with torch.inference_mode():
        ids = torch.tensor([prompts[0]])
        c1, c2 = model.new_cache(1, max_len=8), model.new_cache(1, max_len=8)
        model(ids, cache=c1, logits_to_keep=1)
        model(ids, cache=c2, logits_to_keep=1)
        tok = torch.tensor([[42]])
        want = model(tok, cache=c1, logits_to_keep=1)[:, -1]
        got = step(model, tok, c2)
    assert c2.length == c1.length == 5
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_compile_is_refused_where_it_does_not_apply(model):
    with pytest.raises(ConfigError, match="beam search or speculative"):
        GenerationConfig(num_beams=2, compile=True).validate()
    with pytest.raises(ConfigError, match="beam search or speculative"):
        GenerationConfig(prompt_lookup=3, compile=True).validate()
    with pytest.raises(ConfigError, match="draft model"):
        generate_ids(model, [[1, 2]], GenerationConfig(max_new_tokens=2, compile=True), draft=model)
