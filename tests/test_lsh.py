"""LSH attention (Kitaev et al. 2020, "Reformer"): the chunked form against its definition and against full shared-QK
attention, cached decoding against the full pass, and bad configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close

from lmforge.errors import ConfigError
from lmforge.infer.generate import GenerationConfig, generate_ids
from lmforge.models import make_model
from lmforge.models.mixers.base import MixerContext
from lmforge.models.mixers.lsh import hash_vectors, lsh_attention, lsh_attention_exact
from lmforge.presets import get_preset


def full_shared_qk_attention(qk, v):
    """Causal softmax attention with queries qk and keys qk/|qk|, a token seeing itself only when alone."""
    T, d = qk.shape[-2:]
    scores = qk @ F.normalize(qk, dim=-1).transpose(-1, -2) / math.sqrt(d)
    i = torch.arange(T)
    scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
    scores = torch.where(torch.eye(T, dtype=torch.bool), torch.where(i[:, None] == 0, 0.0, -1e5), scores)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_bucket_and_one_chunk_is_full_shared_qk_attention(n_hashes):
    torch.manual_seed(0)
    qk, v = torch.randn(2, 3, 48, 8), torch.randn(2, 3, 48, 8)
    buckets = hash_vectors(qk, torch.randn(n_hashes, 8, 0))  # n_buckets = 1
    assert (buckets == 0).all()
    ref = full_shared_qk_attention(qk, v)
    assert_rel_close(lsh_attention(qk, v, buckets, chunk_len=48), ref, terms=48)
    # more buckets, still one chunk: every round is exact within its buckets; with the rounds together a
    # query sees every earlier key sharing a bucket in some round, each once
    buckets = hash_vectors(qk, torch.randn(n_hashes, 8, 2))
    exact = lsh_attention_exact(qk, qk, v, buckets, buckets, 0)
    assert_rel_close(lsh_attention(qk, v, buckets, chunk_len=48), exact, terms=48)
    assert (exact - ref).abs().max() > 1e-2  # buckets do restrict what a query sees


def test_chunked_form_equals_the_definition_when_no_bucket_overflows_a_chunk():
    torch.manual_seed(1)
    qk, v = torch.randn(2, 2, 96, 8), torch.randn(2, 2, 96, 8)
    buckets = hash_vectors(qk, torch.randn(2, 8, 8))  # 16 buckets, 2 rounds
    y, overflow = lsh_attention(qk, v, buckets, chunk_len=32, return_overflow=True)
    assert not overflow
    exact = lsh_attention_exact(qk, qk, v, buckets, buckets, 0)
    assert_rel_close(y, exact, terms=96)
    # the first token sees only itself; a query whose buckets it shares with no earlier token, too
    assert_rel_close(y[..., 0, :], v[..., 0, :])


def test_mixer_with_one_bucket_is_full_shared_qk_attention(tiny_llm):
    mixer = tiny_llm("lsh", train=True, **{"lsh.n_buckets": 1, "lsh.chunk_len": 128}).blocks[0].attn
    x = torch.randn(2, 40, 64)
    ctx = MixerContext(torch.arange(40).expand(2, 40), None, None, None, 0)
    with torch.no_grad():
        qk, v = mixer.qkv(x).view(2, 40, 2, 4, 16).permute(2, 0, 3, 1, 4)
        ref = mixer.proj(full_shared_qk_attention(qk, v).transpose(1, 2).reshape(2, 40, 64))
        assert_rel_close(mixer(x, ctx, None), ref, terms=64)


def test_cached_decoding_equals_the_full_pass(tiny_llm):
    model = tiny_llm("lsh")  # 8 buckets, 2 rounds, chunks of 32
    x = torch.randint(0, 256, (2, 56))
    with torch.no_grad():
        full = model(x)
        assert not any(b.attn.last_overflow for b in model.blocks)  # the chunked pass is exact here
        cache = model.new_cache(2)
        steps = [model(x[:, :20], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(20, 56)]
    assert_rel_close(torch.cat(steps, 1), full, terms=256)
    # left-padded batches: each row generates what it generates alone
    gen = GenerationConfig(max_new_tokens=6, temperature=0)
    both = generate_ids(model, [[5, 9, 2, 7, 11], [3, 4]], gen)
    assert both == generate_ids(model, [[5, 9, 2, 7, 11]], gen) + generate_ids(model, [[3, 4]], gen)


def test_bad_lsh_configs_are_refused_with_the_fix():
    base = get_preset("tiny-lsh")
    with pytest.raises(ConfigError, match="lsh.n_buckets must be 1 or a positive even number"):
        make_model(base.replace(**{"lsh.n_buckets": 3}))
    with pytest.raises(ConfigError, match=r"block_size \(128\) must be a multiple of lsh.chunk_len \(48\)"):
        make_model(base.replace(**{"lsh.chunk_len": 48}))
    with pytest.raises(ConfigError, match="lsh_attention shares queries and keys.*n_kv_head"):
        make_model(base.replace(**{"attention.n_kv_head": 2}))
    with pytest.raises(ConfigError, match="lsh.n_hashes must be positive"):
        make_model(base.replace(**{"lsh.n_hashes": 0}))
