"""The chunked cross-entropy through the LM head equals the plain path (logits, then cross-entropy):
values and gradients, for frozen and trainable heads, uniform and per-token loss weights, through the
objectives (causal LM, assistant-only SFT masks, DPO's sequence log-probs) and with a bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close
from helpers.tiny import tiny_llm

from lmforge.adapt import apply_lora
from lmforge.models import DecoderLM
from lmforge.models.linear_ce import linear_cross_entropy
from lmforge.train.objectives import CausalLM

# fp32, each compared against its own scale: a head of 101 (or tiny-llama's 256) logits, 37 (48) tokens summed
# into the weight gradient; the chunked and the plain path sum them in other orders on every CPU


def _plain(h, w, b, y):
    z = F.linear(h, w, b).float()
    nll = F.cross_entropy(z, y, ignore_index=-100, reduction="none")
    return nll, (z.argmax(-1) == y) & (y != -100)


def _inputs(seed: int, n: int = 37, c: int = 16, v: int = 101, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g)
    w = torch.randn(v, c, generator=g) * 0.5
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100  # ignored targets: no loss, no gradient
    return h, w, b, y, torch.rand(n, generator=g)


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("weights", ["mean", "per_token"])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_values_and_gradients_equal_the_plain_path(train_head, weights, chunk):
    h, w, b, y, wt = _inputs(0)
    results = []
    for fn in (_plain, lambda *a: linear_cross_entropy(*a, chunk_rows=chunk)):
        hh = h.clone().requires_grad_()
        ww, bb = w.clone().requires_grad_(train_head), b.clone().requires_grad_(train_head)
        nll, hit = fn(hh, ww, bb, y)
        # "mean": every counted token the same weight (the scaled fast path); "per_token": DPO-like weights
        loss = nll.sum() / (y != -100).sum() if weights == "mean" else (nll * wt).sum()
        loss.backward()
        results.append((nll.detach(), hit, hh.grad, ww.grad, bb.grad))
    (n0, h0, gh0, gw0, gb0), (n1, h1, gh1, gw1, gb1) = results
    assert torch.equal(h0, h1) and h1.dtype == torch.bool
    assert_rel_close(n1, n0, terms=101)
    assert torch.all(n1[y == -100] == 0)
    assert_rel_close(gh1, gh0, terms=101)
    if train_head:
        assert_rel_close(gw1, gw0, terms=37)
        assert_rel_close(gb1, gb0, terms=37)
    else:
        assert gw1 is None and gb1 is None


def test_only_counted_rows_reach_the_head(monkeypatch):
    import types

    from lmforge.models import linear_ce

    rows = []
    shim = types.SimpleNamespace(linear=lambda x, w, b=None: rows.append(x.shape[0]) or F.linear(x, w, b))
    monkeypatch.setattr(linear_ce, "F", shim)
    h, w, b, y, _ = _inputs(1, n=40)
    y[:] = -100
    y[[3, 17, 30]] = torch.tensor([5, 6, 7])  # an SFT batch: a few answer tokens among prompt and padding
    hh = h.clone().requires_grad_()
    nll, hit = linear_cross_entropy(hh, w, b, y)
    nll.sum().backward()
    assert sum(rows) == 3  # the 37 ignored rows were never multiplied by the head
    ref, ref_hit = _plain(h, w, b, y)
    assert_rel_close(nll.detach(), ref, terms=101)
    assert torch.equal(hit, ref_hit)
    assert torch.all(hh.grad[y == -100] == 0) and hh.grad[y != -100].abs().sum() > 0
    y[:] = -100  # nothing counted: zeros, and a backward that works
    hh.grad = None
    nll, hit = linear_cross_entropy(hh, w, b, y)
    nll.sum().backward()
    assert not nll.detach().any() and not hit.any() and not hh.grad.any()


def test_no_gradient_work_in_evaluation_and_mismatched_shapes_are_refused():
    h, w, b, y, _ = _inputs(1, bias=False)
    with torch.no_grad():
        nll, _ = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), None, y)
    assert not nll.requires_grad
    assert_rel_close(nll, _plain(h, w, None, y)[0], terms=101)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, None, y[:-1])


def _model(lora: bool) -> DecoderLM:
    m = tiny_llm("llama", train=True)  # tied embeddings: the head is the embedding table
    if lora:
        apply_lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return m


def _batch(sft: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.bool)
    if sft:  # loss on the assistant's tokens only: a prompt, then an answer, then padding
        mask[:, :10] = False
        mask[1, 20:] = False
    return {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "loss_mask": mask}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("sft", [False, True])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum"])
def test_causal_lm_objective_equals_logits_then_cross_entropy(lora, sft, reduction):
    batch = _batch(sft)
    obj = CausalLM(reduction)
    out = []
    for fused in (False, True):
        m = _model(lora)
        if not fused:
            m.accepts_targets = False  # the objective then takes the loss from the model's logits
        loss, stats = obj.loss(m, batch)
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        out.append((loss.detach(), stats, grads))
    (l0, s0, g0), (l1, s1, g1) = out
    assert_rel_close(l1, l0, terms=256)  # a sequence_sum of ~133 moved 1.5e-5 on an AVX2 CPU: ~1 eps of it
    assert s0["tokens"] == s1["tokens"] and s0["correct"] == s1["correct"]
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        assert_rel_close(g1[k], g0[k], terms=256, msg=k)
    assert ("lm_head.weight" in g1 or "tok_emb.weight" in g1) != lora  # LoRA: the head is frozen


def test_dpo_sequence_logps_use_the_chunked_head_and_equal_the_logits_path():
    from lmforge.align.logps import sequence_logps

    batch = _batch(True)
    out = []
    for fused in (False, True):
        m = _model(True)
        m.accepts_targets = fused
        lp, n = sequence_logps(m, batch)
        (lp * torch.tensor([1.0, -0.5])).sum().backward()  # per-sequence weights, as DPO's loss has
        out.append((lp.detach(), n, [p.grad for p in m.parameters() if p.requires_grad]))
    (a, na, ga), (b, nb, gb) = out
    assert torch.equal(na, nb)
    assert_rel_close(b, a, terms=256)
    for x, y in zip(ga, gb):
        assert_rel_close(y, x, terms=256)


def test_under_bf16_autocast_it_follows_the_plain_path():
    h, w, b, y, wt = _inputs(2, n=40, c=32, v=300)
    out = []
    for fn in (_plain, lambda *a: linear_cross_entropy(*a, chunk_rows=16)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll, _ = fn(hh, ww, None, y)
        (nll * wt).sum().backward()  # per-token weights: the weight gradient is recomputed in backward
        out.append((nll.detach(), hh.grad, ww.grad))
    for a, c in zip(*out):
        assert a.dtype == c.dtype
        assert_rel_close(c, a, 2e-2)  # bf16 matmuls on both: a few of bf16's eps (2**-7) of max|a|
