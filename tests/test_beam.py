"""Beam search against `transformers` beam search on a random-weight tiny GPT-2: same beams, same scores."""

import pytest
import torch
import transformers
from conftest import assert_rel_close

from lmforge.errors import ConfigError
from lmforge.infer.generate import GenerationConfig, beam_search, generate_ids, iter_tokens
from lmforge.interop import hf
from lmforge.loading import build
from lmforge.presets import get_preset

PROMPTS = [[5, 17, 99, 3, 45], [8, 9]]  # run as one left-padded batch on our side


@pytest.fixture(scope="module")
def pair():
    cfg = get_preset("tiny-gpt2").replace(vocab_size=300)
    torch.manual_seed(0)
    hcfg = transformers.AutoConfig.for_model(**{**hf.to_hf_config(cfg), "eos_token_id": None,
                                                "bos_token_id": None, "pad_token_id": 0})
    ref = transformers.AutoModelForCausalLM.from_config(hcfg).eval()
    with torch.no_grad():  # peaky distributions, so that beams are far from ties and EOS gets chosen
        for p in ref.parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return build(cfg, hf.from_hf_state_dict(cfg, ref.state_dict()), "test").eval(), ref


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,new,eos_rank", [
    (4, 1.0, False, 12, 0), (4, 1.0, False, 12, None), (3, 0.0, True, 10, 1), (4, 0.5, "never", 12, 1),
    (3, 2.0, "never", 12, None),
    (5, -0.5, False, 14, 1), (2, 1.0, True, 8, 0),
])
def test_beam_search_equals_transformers(pair, num_beams, length_penalty, early_stopping, new, eos_rank):
    ours, ref = pair
    kw = dict(max_new_tokens=new, num_beams=num_beams, length_penalty=length_penalty,
              early_stopping=early_stopping, num_return_sequences=num_beams)
    eos = None
    if eos_rank is not None:  # an EOS that the beams really produce: the 3rd token of a free beam
        free = beam_search(ours, PROMPTS[:1], GenerationConfig(**{**kw, "early_stopping": False}))[0]
        eos = free[eos_rank].tokens[2]
    mine = beam_search(ours, PROMPTS, GenerationConfig(**kw), eos_ids=[] if eos is None else [eos])
    finished_early = 0
    for b, p in enumerate(PROMPTS):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
                               output_scores=True, **kw)
        for j, h in enumerate(mine[b]):
            seq = out.sequences[j, len(p):].tolist()
            # transformers fills after a finished beam with pad_token_id or, as that is 0, with the EOS
            assert seq[:len(h.tokens)] == h.tokens and set(seq[len(h.tokens):]) <= {0, eos}
            assert_rel_close(h.score, float(out.sequences_scores[j]), 1e-4)  # the logits' parity bar
            finished_early += len(h.tokens) < new
        assert [h.score for h in mine[b]] == sorted((h.score for h in mine[b]), reverse=True)
    assert (finished_early > 0) == (eos is not None)  # the EOS cases really end beams early


def test_one_beam_is_greedy_and_best_beam_is_returned(pair):
    ours, _ = pair
    greedy = generate_ids(ours, PROMPTS, GenerationConfig(max_new_tokens=9, temperature=0))
    assert [h[0].tokens for h in beam_search(ours, PROMPTS, GenerationConfig(max_new_tokens=9))] == greedy
    gen = GenerationConfig(max_new_tokens=9, num_beams=3, num_return_sequences=2)
    assert generate_ids(ours, PROMPTS, gen) == [h[0].tokens for h in beam_search(ours, PROMPTS, gen)]


def test_cache_reorder_equals_recomputing(pair):
    """Each returned beam's score is its summed log-probability under an uncached forward pass."""
    ours, _ = pair
    hyps = beam_search(ours, PROMPTS[:1], GenerationConfig(max_new_tokens=10, num_beams=4, num_return_sequences=4,
                                                           length_penalty=0.0))[0]
    for h in hyps:
        ids = torch.tensor([PROMPTS[0] + h.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(ours(ids)[0].float(), -1)
        n = len(PROMPTS[0])
        total = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(h.tokens))
        assert_rel_close(h.score, total, terms=256)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_beams": 0}, "num_beams"), ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"early_stopping": "sometimes"}, "early_stopping"), ({"length_penalty": float("nan")}, "length_penalty"),
    ({"num_beams": 2, "prompt_lookup": 3}, "cannot be combined"),
])
def test_bad_beam_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig(**kwargs).validate()


def test_beam_search_does_not_stream(pair):
    with pytest.raises(ConfigError, match="cannot stream"):
        next(iter_tokens(pair[0], PROMPTS, GenerationConfig(num_beams=2)))


def test_beam_search_on_a_hybrid_model_reorders_recurrent_states(tiny_llm):
    """tiny-jamba mixes attention and Mamba layers: beams' scores equal an uncached recomputation."""
    model = tiny_llm("jamba")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    prompt = [5, 17, 99, 3]
    hyps = beam_search(model, [prompt], GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=3,
                                                         length_penalty=0.0))[0]
    assert len({tuple(h.tokens) for h in hyps}) == 3
    for h in hyps:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + h.tokens]))[0].float(), -1)
        total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(h.tokens))
        assert_rel_close(h.score, total, terms=256)
    with pytest.raises(ConfigError, match="recurrent"):
        generate_ids(model, [prompt], GenerationConfig(max_new_tokens=4, prompt_lookup=2))
