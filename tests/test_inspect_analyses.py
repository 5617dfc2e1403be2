"""lmforge.inspect's analyses: rollout and flow from transformers' attentions (flow against networkx, as Abnar &
Zuidema computed it), head ablation against masking by hand, the logit lens against lm_head(norm(h_l)) of
transformers' hidden states."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import assert_rel_close

from lmforge.errors import ConfigError
from lmforge.inspect import attention_flow, head_ablation, logit_lens, rollout, trace
from lmforge.inspect.attention import max_flow
from lmforge.interop import hf
from lmforge.llm import LLM
from lmforge.tokenizers.char import CharTokenizer


def _spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def pair(tiny_llm):
    """A tiny Llama with spread-out weights and transformers' LlamaForCausalLM holding the same weights."""
    model = _spread(tiny_llm("llama", n_layer=3))
    cfg = model.config
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf.to_hf_config(cfg)),
                                                        attn_implementation="eager").eval()
    ref.load_state_dict(hf.to_hf_state_dict(cfg, model.state_dict()))
    return model, ref


IDS = torch.tensor([[3, 17, 42, 9, 200, 5, 77, 31, 8, 120]])


def test_rollout_equals_the_product_of_transformers_attentions(pair):
    model, ref = pair
    with torch.no_grad():
        atts = [a[0].mean(0).double().numpy() for a in ref(IDS, output_attentions=True).attentions]
    want = np.eye(IDS.shape[1])
    for a in atts:  # Abnar & Zuidema: 0.5 W + 0.5 I per layer, rows renormalised, then the product over layers
        a = 0.5 * a + 0.5 * np.eye(len(a))
        want = (a / a.sum(-1, keepdims=True)) @ want
    t = trace(model, IDS, capture=("attention",))
    got = rollout(t)
    assert got.shape == (10, 10)
    assert_rel_close(got, want, 1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(10, dtype=torch.float32), atol=1e-5)  # rows stay distributions
    raw = rollout(t, add_residual=False)
    assert_rel_close(raw, np.linalg.multi_dot([a for a in atts[::-1]]), 1e-5)


def test_max_flow_of_a_textbook_network():
    # Cormen et al., "Introduction to Algorithms", figure 26.1: maximum flow 23 from s to t
    cap = np.zeros((6, 6))
    for u, v, c in [(0, 1, 16), (0, 2, 13), (2, 1, 4), (1, 3, 12), (3, 2, 9), (2, 4, 14), (4, 3, 7), (3, 5, 20),
                    (4, 5, 4)]:
        cap[u, v] = c
    assert max_flow(cap, 0, 5) == pytest.approx(23.0)
    assert max_flow(cap, 5, 0) == 0.0


def test_attention_flow_equals_networkx_on_transformers_attentions(pair):
    model, ref = pair
    ids = IDS[:, :7]
    with torch.no_grad():
        atts = [a[0].mean(0).double().numpy() for a in ref(ids, output_attentions=True).attentions]
    T, n = ids.shape[1], len(atts)
    g = nx.DiGraph()
    for layer, a in enumerate(atts):
        a = 0.5 * a + 0.5 * np.eye(T)
        a = a / a.sum(-1, keepdims=True)
        for i in range(T):
            for j in range(T):
                if a[i, j] > 0:
                    g.add_edge((layer, j), (layer + 1, i), capacity=float(a[i, j]))
    t = trace(model, ids, capture=("attention",))
    for source in (T - 1, 3):
        want = [nx.maximum_flow_value(g, (0, j), (n, source)) if g.has_node((0, j)) else 0.0 for j in range(T)]
        got = attention_flow(t, source=source)
        assert got.shape == (T,)
        assert_rel_close(got, want, 1e-5)
        if source < T - 1:
            assert got[source + 1:].abs().max() == 0  # causal: no flow from later tokens
    with pytest.raises(ConfigError, match="position 7 is out of range"):
        attention_flow(t, source=7)


def test_attention_flow_refuses_long_inputs(tiny_llm):
    t = trace(tiny_llm("llama", n_layer=12), torch.randint(0, 256, (1, 60)), capture=("attention",))
    with pytest.raises(ConfigError, match="use a shorter text, or rollout"):
        attention_flow(t)
    with pytest.raises(ConfigError, match="row 1 is out of range"):
        rollout(t, row=1)


def _hand_loss(model, ids, layer=None, head=None):
    """Mean next-token cross-entropy with one head's slice of the output projection's input zeroed by a hook."""
    handle = None
    if layer is not None:
        attn, hs = model.blocks[layer].attn, model.config.head_dim

        def pre(module, args):
            x = args[0].clone()
            x[..., head * hs:(head + 1) * hs] = 0
            return (x,)

        handle = attn.proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            logits = model(ids)
    finally:
        if handle is not None:
            handle.remove()
    return logits, F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def test_head_ablation_equals_masking_each_head_by_hand(pair):
    model, _ = pair
    ids = torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(5))
    res = head_ablation(model, ids, batch_size=2)
    _, base = _hand_loss(model, ids)
    assert res.metric == "loss" and res.baseline == pytest.approx(base, rel=1e-6)
    want = torch.tensor([[_hand_loss(model, ids, layer, h)[1] - base for h in range(4)] for layer in range(3)])
    assert res.scores.shape == (3, 4)
    assert_rel_close(res.scores, want, 1e-4)  # differences of losses: their rounding, relative to the largest
    assert len(res.top) == 10 and abs(res.top[0][2]) == float(res.scores.abs().max())
    assert [abs(c) for _, _, c in res.top] == sorted((abs(c) for _, _, c in res.top), reverse=True)
    # logit difference at the last token, one head by hand
    diff = head_ablation(model, ids, metric="logit_diff", target=11, distractor=12)
    logits, _ = _hand_loss(model, ids, 2, 1)
    plain, _ = _hand_loss(model, ids)
    by_hand = (logits[:, -1, 11] - logits[:, -1, 12]).mean() - (plain[:, -1, 11] - plain[:, -1, 12]).mean()
    assert diff.scores[2, 1].item() == pytest.approx(by_hand.item(), rel=1e-4, abs=1e-5)
    json.dumps(res.to_dict())


def test_head_ablation_with_padded_texts_and_other_families(tiny_llm):
    llm = LLM(_spread(tiny_llm("llama")), CharTokenizer())
    texts = ["to be or not to be", "the rest is silence", "brevity is the soul of wit and more"]
    res = head_ablation(llm, texts, batch_size=2)
    tok = llm.tokenizer
    sums = counts = 0.0
    for t in texts:  # each text alone (no padding): the token-weighted mean loss is the baseline
        ids = torch.tensor([tok.encode(t)])
        _, loss = _hand_loss(llm.model, ids)
        sums, counts = sums + loss * (ids.shape[1] - 1), counts + ids.shape[1] - 1
    assert res.baseline == pytest.approx(sums / counts, rel=1e-5)
    jamba = head_ablation(_spread(tiny_llm("jamba")), torch.randint(0, 256, (2, 6)))
    kinds = [k for k, _ in tiny_llm("jamba").config.layer_mixers()]
    assert [bool(torch.isnan(row).all()) for row in jamba.scores] == [k != "attention" for k in kinds]
    assert "null" in json.dumps(jamba.to_dict())  # NaN (no heads there) as JSON null
    with pytest.raises(ConfigError, match="no attention layers"):
        head_ablation(tiny_llm("mamba"), torch.randint(0, 256, (2, 6)))
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        head_ablation(tiny_llm("bert"), torch.randint(0, 256, (2, 6)))
    with pytest.raises(ConfigError, match="needs a target"):
        head_ablation(llm, texts, metric="logit_diff")
    with pytest.raises(ConfigError, match="unknown metric"):
        head_ablation(llm, texts, metric="accuracy")
    with pytest.raises(ConfigError, match="empty text"):
        head_ablation(llm, ["fine", ""])


def test_logit_lens_equals_head_of_norm_of_transformers_hidden_states(pair):
    model, ref = pair
    lens = logit_lens(model, IDS, k=4, target=42)
    with torch.no_grad():
        out = ref(IDS, output_hidden_states=True)
        hs = list(out.hidden_states)
        # transformers' last hidden state is already normed; the others are the raw stream
        logits = torch.stack([ref.lm_head(h if i == len(hs) - 1 else ref.model.norm(h))[0] for i, h in enumerate(hs)])
    probs = logits.softmax(-1)
    assert lens.top_ids.shape == lens.top_probs.shape == (4, 10, 4)
    assert_rel_close(lens.top_probs, probs.topk(4, dim=-1).values, 1e-5)
    assert_rel_close(probs.gather(-1, lens.top_ids), lens.top_probs, 1e-5)
    assert torch.equal(lens.target_rank, (logits > logits[..., 42:43]).sum(-1))
    with torch.no_grad():
        final = model(IDS)[0].softmax(-1).topk(4, dim=-1)
    assert torch.equal(lens.top_ids[-1], final.indices) and torch.equal(lens.top_probs[-1], final.values)
    assert lens.target_id == 42 and lens.tokens == [""] * 10 and len(lens.top_tokens[0][0]) == 4
    json.dumps(lens.to_dict())


def test_logit_lens_texts_families_and_bad_input(tiny_llm):
    llm = LLM(_spread(tiny_llm("llama", vocab_size=40)), CharTokenizer())  # a vocabulary padded past the tokenizer's
    lens = logit_lens(llm, "to be or not", target="e", k=12)
    tok = llm.tokenizer
    ids = tok.encode("to be or not")
    assert lens.tokens == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert lens.target_id == tok.encode("e", add_special_tokens=False)[0]
    shown = [(int(i), s) for i, s in zip(lens.top_ids[1, 2], lens.top_tokens[1][2])]
    assert all(s == (tok.decode([i], skip_special_tokens=False) if i < 29 else "") for i, s in shown)
    assert any(i >= 29 for i, _ in shown) and any(i < 29 for i, _ in shown)
    t5 = logit_lens(tiny_llm("t5"), torch.tensor([5, 6, 7, 8]), k=2)
    assert t5.top_ids.shape == (3, 1, 2)  # the decoder stack from its start token
    for call, message in [
        (lambda: logit_lens(llm, ""), "empty text"),
        (lambda: logit_lens(llm, "to be", k=0), "k must be"),
        (lambda: logit_lens(llm, "to be", target="be"), "2 tokens"),
        (lambda: logit_lens(llm, "to be", target=999), "target id 999 is out of range"),
        (lambda: logit_lens(tiny_llm("bert", head="none"), torch.tensor([5, 6])), "no LM head"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
