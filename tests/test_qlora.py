"""QLoRA's memory path: a natively loaded GGUF re-quantized layer by layer, no float base weight kept for
backward, activation checkpointing by default, and the same gradients with it as without."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close
from helpers.tiny import tiny_llm

import lmforge
from lmforge.adapt import apply_qlora
from lmforge.interop import gguf as gg
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.quant import NF4Linear

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_native_gguf_becomes_the_same_qlora_model_as_the_dequantized_one(tmp_path):
    src = lmforge.load("preset:tiny-qwen2")  # tied embeddings: the head's table is quantized in the file
    path = gg.save_gguf(src, tmp_path / "m.gguf", "q4_1")
    models = []
    for deq in (True, False):
        m = lmforge.load(str(path), dequantize=deq).model
        assert deq or getattr(m, "quantization", None)  # the native load really holds 4-bit layers
        torch.manual_seed(0)
        models.append(apply_qlora(m, r=4, alpha=8, target_modules=ALL))
    a, b = models
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(b.lm_head, torch.nn.Linear) and b.lm_head.weight is b.tok_emb.weight  # float and tied again
    assert b.quantization is None and sum(isinstance(m, NF4Linear) for m in b.modules()) == 4 * b.config.n_layer
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


def _qlora(checkpointing: bool) -> DecoderLM:
    m = tiny_llm("llama", train=True)
    return apply_qlora(m, r=4, alpha=8, target_modules=ALL, activation_checkpointing=checkpointing)


def test_backward_keeps_no_float_base_weight():
    model = _qlora(False)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, NF4Linear)}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(IDS).logsumexp(-1).mean()
    assert saved and not shapes & set(saved)  # the 4-bit base is rebuilt in backward, not kept
    loss.backward()


def test_activation_checkpointing_is_the_default_and_changes_no_gradient():
    grads = []
    for ckpt in (True, False):
        model = _qlora(ckpt)
        assert model.activation_checkpointing is ckpt
        model(IDS).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert_rel_close(grads[0][n], grads[1][n], terms=256, msg=n)


def test_qlora_rejects_a_pattern_that_matches_nothing_before_changing_anything():
    m = DecoderLM(get_preset("tiny-llama"))
    with pytest.raises(lmforge.errors.ConfigError, match="match no layer"):
        apply_qlora(m, target_modules=["qproj"])
    assert not any(isinstance(x, NF4Linear) for x in m.modules())


def test_estimate_flops_counts_4_per_frozen_weight_and_6_per_trainable_one():
    from lmforge.adapt import apply_lora

    full = DecoderLM(get_preset("tiny-llama"))
    cfg = full.config
    attn = 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * 32
    n_lin = sum(m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Linear))
    assert full.estimate_flops(32) == 6 * n_lin + attn  # everything trains
    lora = apply_lora(DecoderLM(get_preset("tiny-llama")), r=4, alpha=8, target_modules=ALL)
    n_adapter = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert n_adapter > 0
    # the frozen base (its head too: tied to the frozen embedding) needs no weight gradient
    assert lora.estimate_flops(32) == 4 * n_lin + 6 * n_adapter + attn
    assert _qlora(True).estimate_flops(32) == lora.estimate_flops(32)  # NF4 stands for the weights it holds


def test_qlora_on_some_layers_saves_and_loads_back(tmp_path):
    # layers without an adapter stay NF4 too: the saved base holds their float weights
    m = apply_qlora(tiny_llm("llama", train=True), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
        want = m.eval()(IDS)
    lmforge.LLM(m).save(tmp_path / "m")
    back = lmforge.load(str(tmp_path / "m")).model.eval()
    with torch.no_grad():
        assert_rel_close(back(IDS), want, terms=256)
