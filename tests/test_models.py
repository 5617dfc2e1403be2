"""The config-driven decoder: parameter counts, every family runs, cached == uncached decoding."""

import pytest
import torch
from conftest import assert_rel_close

from lmforge.errors import ConfigError
from lmforge.models import DecoderLM
from lmforge.presets import get_preset, list_presets

# decoder-only and encoder presets (encoder-decoders: tests/test_seq2seq.py)
TINY = [n for n in list_presets() if n.startswith("tiny-") and not get_preset(n).is_encoder_decoder]
TINY_DECODERS = [n for n in TINY if get_preset(n).attention.causal]  # encoders have no KV cache


def test_teenygpt_has_the_seed_parameter_count():
    model = DecoderLM(get_preset("teenygpt"))
    assert model.num_params() == 1_089_181


@pytest.mark.parametrize("name,expected", [("gpt2-124m", 124_439_808), ("smollm2-135m", 134_515_008),
                                           ("llama-110m", 109_529_856)])
def test_published_parameter_counts(name, expected):
    with torch.device("meta"):
        model = DecoderLM(get_preset(name), init_weights=False)
    assert model.num_params() == expected


def test_teenygpt_shape_matches_the_seed():
    cfg = get_preset("teenygpt")
    assert (cfg.vocab_size, cfg.block_size, cfg.d_model, cfg.n_head, cfg.n_layer, cfg.mlp.hidden) == (
        29, 150, 32, 8, 4, 4096)
    assert cfg.norm.placement == "post" and not cfg.tie_embeddings and cfg.embed_dropout == 0.1


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_every_family(name):
    torch.manual_seed(0)
    model = DecoderLM(get_preset(name)).train()
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    logits = model(x)
    assert logits.shape == (2, 24, model.config.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def _incremental(model, x, split, mask=None):
    cache = model.new_cache(x.shape[0])
    outs = [model(x[:, :split], attention_mask=None if mask is None else mask[:, :split], cache=cache)]
    for t in range(split, x.shape[1]):
        outs.append(model(x[:, t:t + 1], cache=cache))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", TINY_DECODERS)
def test_cached_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    model = DecoderLM(get_preset(name)).eval()
    x = torch.randint(1, model.config.vocab_size, (2, 48))  # 48 > tiny-mistral's window of 16
    with torch.no_grad():
        full = model(x)
        for split in (1, 20):
            assert_rel_close(_incremental(model, x, split), full, terms=256, msg=f"split {split}")


def test_bf16_model_keeps_an_fp32_cache_on_cpu(tiny_llm):
    model = tiny_llm("llama")
    x = torch.randint(1, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        reference = model(x)  # fp32 throughout
        model.to(torch.bfloat16)
        assert model.new_cache(2).k[0].dtype == torch.float32
        assert model.new_cache(2, dtype=torch.bfloat16).k[0].dtype == torch.bfloat16
        cached = _incremental(model, x, 8)
    assert cached.dtype == torch.bfloat16
    assert_rel_close(cached.float(), reference, 0.05)  # bf16 weights, fp32 attention


@pytest.mark.parametrize("name", TINY_DECODERS)
def test_left_padded_batch_equals_each_prompt_alone(name):
    torch.manual_seed(1)
    model = DecoderLM(get_preset(name)).eval()
    x = torch.randint(1, model.config.vocab_size, (3, 40))
    pads = [0, 7, 19]
    mask = torch.ones(3, 40, dtype=torch.long)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    with torch.no_grad():
        cached = _incremental(model, x, 30, mask)
        uncached = model(x, attention_mask=mask)
        for i, p in enumerate(pads):
            alone = model(x[i:i + 1, p:])[0]
            assert_rel_close(cached[i, p:], alone, terms=256)
            assert_rel_close(uncached[i, p:], alone, terms=256)
            assert torch.isfinite(cached[i]).all()


def test_sliding_window_limits_what_a_token_sees(tiny_llm):
    model = tiny_llm("mistral")
    w = model.config.attention.sliding_window
    x = torch.randint(1, 256, (1, 3 * w))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 256  # changes only what positions < w (directly) can see at layer 1
    with torch.no_grad():
        a, b = model(x), model(y)
    # with 2 layers the receptive field is 2 * (w - 1) tokens back; beyond it nothing may change
    far = 2 * (w - 1) + 1
    assert (a[0, far:] - b[0, far:]).abs().max() == 0
    assert (a[0, :w] - b[0, :w]).abs().max() > 0


def test_accounting():
    model = DecoderLM(get_preset("gpt2-124m"), init_weights=False)
    # 2 (K, V) x 12 layers x 768 x 4 bytes
    assert model.kv_bytes_per_token() == 2 * 12 * 768 * 4
    assert model.kv_bytes_per_token(torch.bfloat16) == 2 * 12 * 768 * 2
    flops = model.estimate_flops(1024)
    n_matmul = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257  # block linears + LM head
    assert flops == pytest.approx(6 * n_matmul + 12 * 12 * 12 * 64 * 1024)


def test_context_overflow_is_an_error():
    model = DecoderLM(get_preset("tiny-gpt2"))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_unknown_preset_names_the_nearest():
    with pytest.raises(ConfigError, match="Did you mean gpt2-124m"):
        get_preset("gpt2-124")


def test_config_validation_and_overrides():
    cfg = get_preset("tiny-llama")
    assert cfg.replace(**{"attention.n_kv_head": 1}).n_kv_head == 1
    with pytest.raises(ConfigError, match="multiple of attention.n_kv_head"):
        cfg.replace(**{"attention.n_kv_head": 3})
    with pytest.raises(ConfigError, match="unknown config field"):
        cfg.replace(**{"attention.heads": 3})
    with pytest.raises(ConfigError, match="mlp.activation"):
        cfg.replace(**{"mlp.activation": "tanh"})
    from lmforge.config import Config
    assert Config.from_dict(cfg.to_dict()) == cfg
