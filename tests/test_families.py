"""Every block family beyond dense attention (issue 11), end to end: a tiny preset trains on the embedded
corpus, saves and loads exactly, generates through the one generator; bad layer patterns are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmforge
from lmforge.config import CHANNEL_MIXERS, TOKEN_MIXERS, get_preset
from lmforge.data.corpus import corpus_works, read_work
from lmforge.errors import ConfigError
from lmforge.llm import LLM
from lmforge.models import DecoderLM
from lmforge.models.mixers import channel_mixers, token_mixers
from lmforge.tokenizers.char import CharTokenizer
from lmforge.train import CausalLM, OptimConfig, TokenWindows, TrainConfig, Trainer

FAMILIES = ["tiny-moe", "tiny-mamba", "tiny-jamba", "tiny-linear"]


def _corpus_tokens(tok, n=20000) -> np.ndarray:
    text = tok.normalize(read_work(corpus_works("train")[0])[:n])
    return np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.uint16)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_family_trains_saves_loads_generates(name, tmp_path):
    torch.manual_seed(0)
    tok = CharTokenizer()
    cfg = get_preset(name).replace(vocab_size=tok.vocab_size, block_size=64)
    model = DecoderLM(cfg)
    toks = _corpus_tokens(tok)
    tc = TrainConfig(max_steps=25, batch_size=8, progress=False, peak_flops=1e11, eval_every=0,
                     checkpoint_every=0)
    tr = Trainer(model, CausalLM(), TokenWindows(toks, 8, 32, val_tokens=toks[:3000], eval_batches=2), tc,
                 OptimConfig(lr=3e-3, warmup_steps=3, min_lr=3e-4))
    before = tr.evaluate()["loss"]
    tr.fit()
    after = tr.evaluate()
    assert after["loss"] < before - 0.5, (before, after)
    llm = LLM(model.eval(), tok, name)
    llm.save(tmp_path / "m")
    back = lmforge.load(tmp_path / "m")
    sd, sd2 = model.state_dict(), back.model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    a = llm.generate("to be or not", max_new_tokens=20, temperature=0)
    assert a == back.generate("to be or not", max_new_tokens=20, temperature=0) and len(a) > 0


def test_mixer_registries_match_the_config_names():
    assert set(token_mixers()) == set(TOKEN_MIXERS)
    assert set(channel_mixers()) | {"none"} == set(CHANNEL_MIXERS)


def test_unknown_block_type_names_the_valid_ones():
    cfg = get_preset("tiny-llama")
    with pytest.raises(ConfigError, match="unknown token mixer .atention..*valid: attention, mamba"):
        cfg.replace(layers=["attention", "atention"])
    with pytest.raises(ConfigError, match="unknown channel mixer 'moee'.*valid: mlp, moe"):
        cfg.replace(block="attention+moee")
    with pytest.raises(ConfigError, match="one block per layer"):
        cfg.replace(layers=["attention"])


def test_per_layer_pattern_builds_those_mixers():
    cfg = get_preset("tiny-llama").replace(layers=["attention+moe", "attention"])
    model = DecoderLM(cfg)
    assert model.blocks[0].channel_mixer.__class__.__name__ == "MoE"
    assert model.blocks[1].channel_mixer.__class__.__name__ == "MLP"
    assert any(k.startswith("blocks.0.moe.") for k in model.state_dict())


def test_linear_attention_chunked_equals_its_definition():
    from lmforge.models.mixers.linear_attention import feature_map, linear_attention
    torch.manual_seed(0)
    q, k, v = feature_map(torch.randn(2, 3, 150, 8)), feature_map(torch.randn(2, 3, 150, 8)), torch.randn(2, 3, 150, 8)
    y, S, z = linear_attention(q, k, v)
    a = (q @ k.transpose(-1, -2)).tril()  # the quadratic form, softmax replaced by phi(q).phi(k)
    ref = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    assert (y - ref).abs().max() <= 1e-5
    assert torch.allclose(S, k.transpose(-1, -2) @ v, atol=1e-4) and torch.allclose(z, k.sum(2), atol=1e-4)
