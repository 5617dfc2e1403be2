"""Ternary BitNet b1.58: QAT weights take three values, the packed kernel equals the reference, training works."""

import dataclasses

import pytest
import torch
from conftest import assert_rel_close

import lmforge
from lmforge.data.corpus import corpus_works, read_work
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.quant import is_quantized, quantize
from lmforge.quant.ternary import (
    BitLinear,
    TernaryLinear,
    absmean_ternary,
    pack_model,
    pack_ternary,
    ternarize,
    ternary_reference,
    unpack_ternary,
)
from lmforge.tokenizers import CharTokenizer


def test_pack_round_trip_any_width():
    t = torch.randint(-1, 2, (5, 13)).float()
    assert pack_ternary(t).shape == (5, 4)
    assert torch.equal(unpack_ternary(pack_ternary(t), 13), t)


def test_packed_kernel_equals_unpacked_reference():
    torch.manual_seed(0)
    lin = BitLinear(96, 40)
    layer = TernaryLinear.from_linear(lin)
    assert layer.packed.numel() == 40 * 96 // 4  # 2 bits per weight
    x = torch.randn(3, 7, 96)
    t, gamma = absmean_ternary(lin.weight.detach())
    torch.testing.assert_close(layer(x), ternary_reference(x, t, gamma, lin.bias), rtol=0, atol=0)
    # and the training layer's forward computes the same function
    assert_rel_close(layer(x), lin(x).detach(), terms=96)


@pytest.mark.slow
def test_ternary_model_trains_on_embedded_corpus_and_weights_take_three_values(tmp_path):
    cfg = dataclasses.replace(get_preset("tiny-teenygpt"), bitlinear=True)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 4 * cfg.n_layer
    tok = CharTokenizer()
    text = tok.normalize(read_work(corpus_works("train")[0]))[:20000]
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    T = 32
    for _ in range(60):
        starts = torch.randint(0, len(data) - T - 1, (16,), generator=g)
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3, (losses[:10], losses[-10:])
    # what the loss saw: each weight is -gamma, 0 or +gamma of its layer
    for m in model.modules():
        if isinstance(m, BitLinear):
            t, gamma = absmean_ternary(m.weight.detach())
            assert set((t * gamma).unique().tolist()) == {-gamma.item(), 0.0, gamma.item()}
    # saved and reloaded it is still a ternary model; packed for inference it gives the same logits
    llm = lmforge.LLM(model, tok)
    llm.save(tmp_path / "m")
    back = lmforge.load(tmp_path / "m")
    assert back.config.bitlinear and isinstance(back.model.blocks[0].mlp.fc, BitLinear)
    ids = x[:2]
    with torch.no_grad():
        ref = model(ids)
        assert_rel_close(back.model(ids), ref, terms=256)
        packed = pack_model(back.model)
        assert isinstance(packed.blocks[0].attn.qkv, TernaryLinear)
        assert_rel_close(packed(ids), ref, terms=256)
    assert is_quantized(packed)


def test_ternarize_a_float_model_for_finetuning_shares_parameters():
    model = lmforge.load("preset:tiny-llama").model
    w = model.blocks[0].attn.qkv.weight
    ternarize(model)
    assert isinstance(model.blocks[0].attn.qkv, BitLinear) and model.blocks[0].attn.qkv.weight is w
    assert type(model.lm_head) is torch.nn.Linear and model.config.bitlinear
    try:
        quantize(model, "int8")
    except ValueError as e:
        assert "already quantized" in str(e)
    else:
        raise AssertionError("quantizing a ternary model must fail")
