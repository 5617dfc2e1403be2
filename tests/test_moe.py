"""Mixture of experts: routing, capacity/dropping, auxiliary losses, and parity with transformers' Mixtral."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import assert_rel_close
from helpers.hf_parity import assert_hf_round_trip

from lmforge.errors import ConfigError
from lmforge.interop import hf
from lmforge.loading import build
from lmforge.models import DecoderLM, make_model
from lmforge.models.mixers.moe import MoE
from lmforge.presets import get_preset
from lmforge.train import CausalLM


def _moe(**over):
    cfg = get_preset("tiny-moe").replace(**{f"moe.{k}": v for k, v in over.items()})
    torch.manual_seed(0)
    return MoE(cfg), cfg


def test_load_balancing_loss_equals_a_hand_computed_example():
    m, _ = _moe(n_experts=4, top_k=2)
    # 3 tokens, router logits chosen directly
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    probs, gates, experts = m.route(logits)
    # top-2 per token: {0,1}, {1,2}, {3, first of the ties 0/1/2 by topk}; count by hand from `experts`
    counts = [0, 0, 0, 0]
    for row in experts.tolist():
        for e in row:
            counts[e] += 1
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    mean_p = [sum(p[n][e] for n in range(3)) / 3 for e in range(4)]
    expected = 4 * sum(counts[e] / 3 * mean_p[e] for e in range(4))
    assert experts[0].tolist() == [0, 1] and sorted(experts[1].tolist()) == [1, 2] and experts[2, 0] == 3
    assert m.balance_loss(probs, experts).item() == pytest.approx(expected, rel=1e-6)
    # uniform routing reaches the minimum, top_k
    u = torch.zeros(8, 4)
    pu, _, eu = m.route(u + torch.arange(8)[:, None].eq(torch.arange(4)[None] * 2).float() * 0)
    assert m.balance_loss(pu, torch.tensor([[0, 1], [2, 3]] * 4)).item() == pytest.approx(2.0)
    # gates are the top-2 probabilities renormalised
    assert torch.allclose(gates[0], torch.tensor([p[0][0], p[0][1]]) / (p[0][0] + p[0][1]))


def _reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition, no batching."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = (m.router.weight @ x[n]).softmax(-1)
        g, e = probs.topk(m.top_k)
        g = g / g.sum()
        for gi, ei in zip(g, e):
            gate, up = (m.w_fc[ei] @ x[n]).chunk(2)
            out[n] += gi * (m.w_proj[ei] @ (F.silu(gate) * up))
    return out


def test_batched_experts_equal_the_per_token_definition():
    m, _ = _moe()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        y = m(x)
        ref = _reference(m, x.reshape(-1, 64)).view_as(y)
    assert_rel_close(y, ref, terms=256)
    assert m.last_stats["dropped"].item() == 0


def test_capacity_drops_tokens_and_their_output_is_the_residual():
    m, _ = _moe(capacity_factor=0.5)
    x = torch.randn(1, 16, 64)
    with torch.no_grad():
        y = m(x).view(-1, 64)
        full = _reference(m, x.view(-1, 64))
    N, E, k = 16, 4, 2
    cap = math.ceil(0.5 * N * k / E)  # 4 assignments per expert, 16 of 32 kept
    assert m.last_stats["dropped"].item() == N * k - E * cap
    dropped_tokens = (y.abs().sum(-1) == 0)
    assert dropped_tokens.sum().item() == m.last_stats["dropped_tokens"].item() > 0
    # a token with both assignments kept is exactly the dense result
    _, _, experts = m.route(m.router(x.view(-1, 64)))
    order = experts.reshape(-1)
    place = torch.zeros_like(order)
    for e in range(E):
        idx = (order == e).nonzero().flatten()
        place[idx] = torch.arange(len(idx))
    both = (place.view(N, k) < cap).all(1)
    assert both.any()
    assert_rel_close(y[both], full[both], terms=256)
    # in a block, the MoE adds nothing for a fully dropped token: the residual passes through
    model = DecoderLM(get_preset("tiny-moe").replace(**{"moe.capacity_factor": 0.5}))
    block = model.blocks[0]
    seen = {}
    block.moe.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 16)))
    rows = seen["out"].view(-1, 64).abs().sum(-1) == 0
    assert rows.sum().item() == block.moe.last_stats["dropped_tokens"].item()


def test_aux_loss_reaches_the_training_loss_and_its_gradient(tiny_llm):
    model = tiny_llm("moe", train=True)
    x = torch.randint(0, 256, (2, 16))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    loss, stats = CausalLM().loss(model, batch)
    lm = stats["nll"].item() / stats["tokens"].item()
    aux = model.aux_loss()
    expected = sum(0.01 * b.moe.last_stats["balance_loss"] + 0.001 * b.moe.last_stats["z_loss"]
                   for b in model.blocks)
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(lm + aux.item(), rel=1e-5)
    loss.backward()
    assert model.blocks[0].moe.router.weight.grad.abs().sum() > 0
    summary = CausalLM().summarize({k: v.item() for k, v in stats.items()})
    assert summary["aux_loss"] == pytest.approx(aux.item(), rel=1e-5) and summary["moe_dropped"] == 0


@pytest.mark.parametrize("over,message", [({"top_k": 5}, "moe.top_k must be in 1..moe.n_experts"),
                                          ({"n_experts": 0}, "moe.n_experts must be positive"),
                                          ({"capacity_factor": 0.0}, "capacity_factor must be positive")])
def test_bad_moe_configs_are_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        make_model(get_preset("tiny-moe").replace(**{f"moe.{k}": v for k, v in over.items()}))


def test_mixtral_shape_preset():
    with torch.device("meta"):
        model = DecoderLM(get_preset("mixtral-8x7b"), init_weights=False)
    assert round(model.num_params() / 1e9, 1) == 46.7  # Jiang et al. 2024, "Mixtral of Experts": 46.7B total
    active = model.estimate_flops(1) / 6 - model.config.vocab_size * model.config.d_model
    assert 12.5e9 < active < 13.0e9  # 12.9B active (the paper's count includes the embedding table)


# ---- parity with transformers' Mixtral (random weights from a config) -------------------------------

def _mixtral_pair(seed=0):
    cfg = get_preset("tiny-moe").replace(**{"moe.n_experts": 4, "n_layer": 2})
    torch.manual_seed(seed)
    hcfg = transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))
    ref = transformers.AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return cfg, ref


@pytest.mark.slow
def test_mixtral_folder_import_export_matches_transformers(tmp_path):
    cfg, ref = _mixtral_pair()
    assert_hf_round_trip(ref, cfg.vocab_size, tmp_path)
    assert hf.from_hf_config(hf.to_hf_config(cfg)).layer_mixers() == cfg.layer_mixers()


def test_mixtral_in_memory_layout_maps_too():
    cfg, ref = _mixtral_pair(seed=1)
    ours = build(cfg, hf.from_hf_state_dict(cfg, ref.state_dict()), "test").eval()
    x = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert_rel_close(ours(x), ref(x).logits, 1e-4)  # the parity bar, of the logits' max-abs
    assert hf.exportable(cfg.replace(**{"moe.capacity_factor": 1.0})) is not None


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_matmul_experts_equal_the_loop_over_experts(activation, tiny_llm):
    """The CPU path (one grouped matmul per projection) against the per-expert loop other devices run:
    outputs and gradients, with an expert that receives no token."""
    moe = tiny_llm("moe", train=True, **{"mlp.activation": activation}).blocks[0].moe
    xs = torch.randn(50, 64, requires_grad=True)
    counts = torch.tensor([10, 0, 25, 15])
    outs, grads = [], []
    for grouped in (True, False):
        y = moe.experts(xs, counts, grouped=grouped)
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append([t.grad.clone() for t in (xs, moe.w_fc, moe.w_proj)])
        xs.grad = moe.w_fc.grad = moe.w_proj.grad = None
    assert_rel_close(outs[0], outs[1], terms=256)
    for a, b in zip(*grads):
        assert_rel_close(a, b, terms=256)
    assert grads[0][1][1].abs().max() == 0  # the idle expert gets no gradient
