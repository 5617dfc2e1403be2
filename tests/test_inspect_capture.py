"""lmforge.inspect's capture: attention probabilities and hidden states equal transformers' (output_attentions /
output_hidden_states, eager attention, the same weights) for decoders, a padded encoder and T5; interventions
checked by hand; nothing left behind and nothing changed when not inspecting; bad input gets one line."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.errors import ConfigError
from lmforge.infer.generate import GenerationConfig, generate_ids
from lmforge.inspect import Interventions, attention_maps, trace
from lmforge.interop import hf, hf_t5
from lmforge.llm import LLM
from lmforge.loading import build

BAR = 1e-5  # the bar: max abs diff in fp32


def _spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights wide enough that attention is far from uniform (a tiny model's init attends almost evenly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "norm" in name or "ln" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def _causal_twin(model):
    cfg = model.config
    hcfg = transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))
    ref = transformers.AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager").eval()
    missing, unexpected = ref.load_state_dict(hf.to_hf_state_dict(cfg, model.state_dict()), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return ref


def _padded(vocab: int, B: int = 3, T: int = 24, left: bool = True, seed: int = 1):
    """(ids, mask): row 0 full, rows 1 and 2 with 5 and 11 padding positions (on the left for a decoder)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in ((1, 5), (2, 11)):
        mask[row, slice(0, n) if left else slice(T - n, T)] = 0
    return ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    d = (a.double() - b.double()).abs()
    return float((d if keep is None else d[keep]).max())


def _mixtral_twin(tiny_llm):
    """A tiny Mixtral: transformers' model with spread random weights, and ours loaded from its state dict (its
    packed expert layout maps one way only)."""
    cfg = tiny_llm("moe", **{"moe.n_experts": 4}).config
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf.to_hf_config(cfg)),
                                                        attn_implementation="eager").eval()
    _spread(ref)
    return build(cfg, hf.from_hf_state_dict(cfg, ref.state_dict()), "test").eval(), ref


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "moe"])
def test_decoder_attention_and_hidden_states_equal_transformers(family, tiny_llm):
    if family == "moe":
        model, ref = _mixtral_twin(tiny_llm)
    else:
        model = _spread(tiny_llm(family))
        ref = _causal_twin(model)
    ids, mask = _padded(model.config.vocab_size)  # T 24 > tiny-mistral's window of 16: the window is masked too
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    t = trace(model, ids, attention_mask=mask)
    with torch.no_grad():
        r = ref(ids, attention_mask=mask, position_ids=positions, output_attentions=True, output_hidden_states=True)
    real = mask.bool()
    n = model.config.n_layer
    assert len(t.attention) == n and len(t.residual) == n + 1 and len(t.mixer_out) == len(t.mlp_out) == n
    for layer in range(n):  # real queries (padding rows differ by design: ours see themselves only)
        a = t.attention[layer]
        assert a.dtype == torch.float32 and a.shape == r.attentions[layer].shape
        assert _max_diff(a, r.attentions[layer], real[:, None, :, None].expand_as(a)) <= BAR
        assert float(a[real[:, None, :, None].expand_as(a)].amax()) > 0.5  # peaked: the comparison means something
        assert _max_diff(t.residual[layer], r.hidden_states[layer], real) <= BAR
    # transformers' last hidden state is after the final norm; ours is the stream itself
    with torch.no_grad():
        assert _max_diff(model.norm_f(t.residual[n]), r.hidden_states[n], real) <= BAR
    assert _max_diff(t.logits, r.logits, real) <= 1e-4 * float(r.logits.abs().max())


def test_mixer_and_mlp_outputs_add_up_to_the_residual(tiny_llm):
    model = _spread(tiny_llm("llama"))
    t = trace(model, torch.randint(0, 256, (2, 9)))
    for layer in range(model.config.n_layer):  # pre-norm: x + mixer(norm(x)) + mlp(norm(...))
        want = t.residual[layer] + t.mixer_out[layer] + t.mlp_out[layer]
        assert torch.equal(t.residual[layer + 1], want)


def test_padded_encoder_equals_transformers(tiny_llm):
    from lmforge.interop.hf import to_hf_config, to_hf_state_dict

    model = _spread(tiny_llm("bert", head="none"))
    cfg = model.config
    ref = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**to_hf_config(cfg)),
                                             attn_implementation="eager").eval()
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(cfg, model.state_dict()), strict=False)
    assert not unexpected, unexpected
    ids, mask = _padded(cfg.vocab_size, T=20, left=False)
    t = trace(model, ids, attention_mask=mask)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        packed = model(ids, attention_mask=mask)  # the normal path runs the real tokens only (Unpadded)
    real = mask.bool()
    # at real positions (a padding position's own output is the model's business: ours gives it the position
    # after the last real token, transformers' BERT counts on; neither reaches a real token)
    for layer in range(cfg.n_layer):
        a = t.attention[layer]
        assert _max_diff(a, r.attentions[layer], real[:, None, :, None].expand_as(a)) <= BAR
        assert a[1, :, :, 20 - 5:].abs().max() == 0  # padding keys get nothing
    for layer in range(cfg.n_layer + 1):
        assert _max_diff(t.residual[layer], r.hidden_states[layer], real) <= BAR
    assert _max_diff(t.logits, packed, real) <= BAR  # the real tokens as the packed path computes them
    assert "pack_padding" not in vars(model)


def test_t5_encoder_decoder_and_cross_attention_equal_transformers(tiny_llm):
    model = _spread(tiny_llm("t5"), seed=3)
    cfg = model.config
    ref = transformers.AutoModelForSeq2SeqLM.from_config(transformers.T5Config(**hf_t5.to_hf_config(cfg)),
                                                         attn_implementation="eager").eval()
    missing, unexpected = ref.load_state_dict(hf_t5.to_hf_state_dict(cfg, model.state_dict()), strict=False)
    assert not unexpected and all("embed_tokens" in k or "lm_head" in k for k in missing), (missing, unexpected)
    src, mask = _padded(cfg.vocab_size, T=15, left=False)
    tgt = torch.randint(2, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(4))
    t = trace(model, src, attention_mask=mask, decoder_input_ids=tgt)
    with torch.no_grad():
        r = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_attentions=True,
                output_hidden_states=True)
    ne, nd = cfg.encoder_layers, cfg.n_layer
    assert len(t.encoder_attention) == ne and len(t.attention) == len(t.cross_attention) == nd
    for layer in range(ne):
        assert _max_diff(t.encoder_attention[layer], r.encoder_attentions[layer]) <= BAR
        assert _max_diff(t.encoder_residual[layer], r.encoder_hidden_states[layer]) <= BAR
    for layer in range(nd):
        assert _max_diff(t.attention[layer], r.decoder_attentions[layer]) <= BAR
        assert t.cross_attention[layer].shape == (3, cfg.n_head, 7, 15)
        assert _max_diff(t.cross_attention[layer], r.cross_attentions[layer]) <= BAR
        assert _max_diff(t.residual[layer], r.decoder_hidden_states[layer]) <= BAR
    with torch.no_grad():
        assert _max_diff(model.encoder.norm_f(t.encoder_residual[ne]), r.encoder_hidden_states[ne]) <= BAR
        assert _max_diff(model.decoder.norm_f(t.residual[nd]), r.decoder_hidden_states[nd]) <= BAR
    assert _max_diff(t.logits, r.logits) <= 1e-4 * float(r.logits.abs().max())


def _no_leftovers(model: torch.nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
        assert "probe" not in vars(m) and "pack_padding" not in vars(m)


def test_zero_cost_when_off(tiny_llm):
    model = _spread(tiny_llm("llama"))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=10, temperature=0.0)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    with torch.no_grad():
        before, before_gen = model(ids), generate_ids(model, prompts, gen)
    t = trace(model, ids, interventions=Interventions(steer={0: torch.zeros(64)}))
    assert torch.equal(t.logits, before)  # the traced call's output is the fused path's, bit for bit
    _no_leftovers(model)
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert generate_ids(model, prompts, gen) == before_gen
    # a failing intervention (a patch of the wrong shape) raises inside the pass and still leaves nothing behind
    with pytest.raises(ConfigError, match="patch"):
        trace(model, ids, interventions=Interventions(patch={("mixer_out", 1): torch.zeros(3, 3)}))
    _no_leftovers(model)
    assert model.activation_checkpointing is False


def test_probabilities_are_computed_only_when_asked(tiny_llm, monkeypatch):
    import lmforge.models.capture as capture

    model = tiny_llm("llama")

    def refuse(*a, **k):
        raise AssertionError("attention probabilities computed without being asked for")

    monkeypatch.setattr(capture, "attention_probs", refuse)
    t = trace(model, torch.randint(0, 256, (1, 6)), capture=("residual", "mlp_out"))
    assert t.attention == [] and t.mixer_out == [] and len(t.residual) == 3


def _hand_head_zeroing(model, layer: int, heads: list[int]):
    """A pre-hook zeroing those heads' slices of the output projection's input (what a head mask should do)."""
    attn = model.blocks[layer].attn
    hs = attn.head_dim

    def pre(module, args):
        x = args[0].clone()
        for h in heads:
            x[..., h * hs:(h + 1) * hs] = 0
        return (x,)

    return attn.proj.register_forward_pre_hook(pre)


def test_head_mask_is_zeroing_the_heads_output_slice_by_hand(tiny_llm):
    model = _spread(tiny_llm("llama"))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    t = trace(model, ids, interventions=Interventions(head_mask={1: [0, 2]}))
    handle = _hand_head_zeroing(model, 1, [0, 2])
    try:
        with torch.no_grad():
            want = model(ids)
    finally:
        handle.remove()
    assert torch.equal(t.logits, want)
    assert not torch.equal(t.logits, trace(model, ids, capture=()).logits)
    # every head of a layer masked = that layer's attention skipped: the residual passes the sublayer unchanged
    every = trace(model, ids, interventions=Interventions(head_mask={0: [0, 1, 2, 3]}))
    assert every.mixer_out[0].abs().max() == 0
    skipped = model.blocks[0].attn.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            assert torch.equal(every.logits, model(ids))
    finally:
        skipped.remove()
    assert torch.equal(every.logits, trace(model, ids, interventions=Interventions(zero=[("mixer_out", 0)])).logits)


def test_patching_and_steering(tiny_llm):
    model = _spread(tiny_llm("llama"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 256, (1, 8), generator=g), torch.randint(0, 256, (1, 8), generator=g)
    ta, tb = trace(model, a), trace(model, b)
    # the whole stream patched at the embeddings: the run is b's from there on
    p0 = trace(model, a, interventions=Interventions(patch={("residual", 0): tb.residual[0]}))
    assert torch.equal(p0.logits, tb.logits)
    # an MLP output patched from b: later layers change, that site holds b's activation
    p1 = trace(model, a, interventions=Interventions(patch={("mlp_out", 0): tb.mlp_out[0]}))
    assert torch.equal(p1.mlp_out[0], tb.mlp_out[0]) and torch.equal(p1.mixer_out[0], ta.mixer_out[0])
    assert not torch.equal(p1.logits, ta.logits)
    # steering: the vector is added to the stream after the block, and read through the final norm and head
    v = torch.randn(64, generator=g)
    s = trace(model, a, interventions=Interventions(steer={1: v}))
    assert torch.equal(s.residual[2], ta.residual[2] + v)
    with torch.no_grad():
        assert torch.equal(s.logits, model.head_logits(model.norm_f(ta.residual[2] + v)))


def test_families_without_attention_capture_the_rest(tiny_llm):
    model = tiny_llm("jamba")  # attention and Mamba layers interleaved
    t = trace(model, torch.randint(0, 256, (1, 7)))
    kinds = [tok for tok, _ in model.config.layer_mixers()]
    assert [a is not None for a in t.attention] == [k == "attention" for k in kinds]
    assert all(r.shape == (1, 7, 64) for r in t.residual + t.mixer_out)
    mamba = kinds.index("mamba")
    with pytest.raises(ConfigError, match=f"layer {mamba}'s token mixer is mamba") as e:
        attention_maps(t, mamba)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not attention"):
        trace(model, torch.randint(0, 256, (1, 7)), interventions=Interventions(head_mask={mamba: [0]}))
    m = trace(tiny_llm("mamba"), torch.randint(0, 256, (1, 5)))
    assert m.attention == [None, None] and m.mlp_out == [None, None]


@pytest.mark.parametrize("call, message", [
    (lambda m: trace(m, torch.zeros(1, 0, dtype=torch.long)), "empty input_ids"),
    (lambda m: LLM(m).inspect("  "), "empty text"),
    (lambda m: trace(m, torch.tensor([[1, 999]])), "outside the vocabulary"),
    (lambda m: trace(m, torch.tensor([[1, 2]]), capture=("attn",)), "unknown capture 'attn'"),
    (lambda m: trace(m, torch.tensor([[1, 2]]), interventions=Interventions(head_mask={2: [0]})),
     "layer 2 is out of range"),
    (lambda m: trace(m, torch.tensor([[1, 2]]), interventions=Interventions(head_mask={0: [4]})),
     "head 4 is out of range"),
    (lambda m: trace(m, torch.tensor([[1, 2]]), interventions=Interventions(zero=[("residual", 0)])),
     "unknown site 'residual'"),
    (lambda m: trace(m, torch.tensor([[1, 2]]), interventions=Interventions(steer={0: torch.zeros(3)})),
     "steering vector"),
    (lambda m: attention_maps(trace(m, torch.tensor([[1, 2]])), 0, 7), "head 7 is out of range"),
    (lambda m: attention_maps(trace(m, torch.tensor([[1, 2]]), capture=("residual",)), 0), "holds no attention"),
    (lambda m: attention_maps(trace(m, torch.tensor([[1, 2]])), -3), "layer -3 is out of range"),
])
def test_bad_input_gets_one_line(call, message, tiny_llm):
    model = tiny_llm("llama")
    with pytest.raises(ConfigError, match=message) as e:
        call(model)
    assert "\n" not in str(e.value)
    _no_leftovers(model)


def test_an_ngram_model_has_no_layers_to_inspect():
    import numpy as np

    from lmforge.models.ngram import NGramLM

    llm = LLM(NGramLM.fit(np.arange(50) % 7, vocab_size=8, order=2))
    with pytest.raises(ConfigError, match="no blocks to inspect"):
        llm.inspect(torch.tensor([1, 2, 3]))


def test_llm_inspect_and_attention_maps_shapes(tiny_llm):
    llm = LLM(_spread(tiny_llm("llama")))
    t = llm.inspect(torch.tensor([3, 4, 5, 6]), capture=("attention",))
    assert t.residual == [] and t.tokens == [[""] * 4]
    assert attention_maps(t).shape == (2, 1, 4, 4, 4)
    assert attention_maps(t, 1).shape == (1, 4, 4, 4) and attention_maps(t, -1, 2).shape == (1, 4, 4)
    assert attention_maps(t, None, 3).shape == (2, 1, 4, 4)
    assert torch.equal(attention_maps(t, 1, 2), t.attention[1][:, 2])
    rows = attention_maps(t).sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)
    assert torch.equal(attention_maps(t).triu(1), torch.zeros(2, 1, 4, 4, 4))  # causal
    d = t.to_dict()
    assert len(d["attention"]) == 2 and len(d["attention"][0]) == 4 and d["mixers"] == ["attention"] * 2


def test_trace_with_grad_keeps_the_graph(tiny_llm):
    model = tiny_llm("gpt2")
    t = trace(model, torch.tensor([[1, 2, 3]]), grad=True, capture=("residual",))
    t.logits[0, -1, 5].backward()
    assert model.tok_emb.weight.grad is not None and t.residual[1].requires_grad


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "falcon", "teenygpt", "moe", "jamba",
                                    "linear", "retnet", "rwkv", "lstm", "s4d", "lsh", "xl", "mamba", "bert",
                                    "roberta", "transformer-base"])
def test_every_family_traces_with_its_own_output(family, tiny_llm):
    model = tiny_llm(family)
    cfg = model.config
    ids = torch.randint(5, min(cfg.vocab_size, 60), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, decoder_input_ids=ids[:, :4]) if cfg.is_encoder_decoder else model(ids)
    t = trace(model, ids, decoder_input_ids=ids[:, :4] if cfg.is_encoder_decoder else None)
    assert torch.equal(t.logits, want.float())
    stack = model.decoder if cfg.is_encoder_decoder else model
    n, T = len(stack.blocks), 4 if cfg.is_encoder_decoder else 9
    kinds = [tok for tok, _ in stack.config.layer_mixers()]
    assert t.mixers == kinds and len(t.residual) == n + 1
    assert [a is not None for a in t.attention] == [k == "attention" for k in kinds]
    assert all(r.shape == (2, T, cfg.d_model) for r in t.residual + t.mixer_out)
    assert [m is None for m in t.mlp_out] == [b.channel_mixer is None for b in stack.blocks]
    if cfg.is_encoder_decoder:
        assert len(t.encoder_residual) == len(model.encoder.blocks) + 1 and len(t.cross_attention) == n
    _no_leftovers(model)
