"""Count-based n-gram baselines: interpolated modified Kneser-Ney and absolute-discount backoff
against a direct, dictionary-based reading of their formulas; exact normalisation; scored by the one
perplexity eval; save/load; the CLI; bad input."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import assert_rel_close

import lmforge
from lmforge.cli import main
from lmforge.commands.train import ngram
from lmforge.errors import ConfigError, FormatError
from lmforge.evaluate import perplexity
from lmforge.models.ngram import NGramLM
from lmforge.tokenizers import CharTokenizer
from lmforge.train.ngram import fit_ngram

V, N = 6, 3  # token 5 never occurs in training: contexts holding it are unseen
F64 = 2**12 * torch.finfo(torch.float64).eps  # ~1e-12 of the probabilities' scale: float64 formulas, chained per order


def _corpus(n: int = 400) -> list[int]:
    g = np.random.default_rng(0)
    trans = g.dirichlet(np.full(5, 0.4), size=5)  # a skewed Markov chain: counts of 1, 2, 3, 4+ all occur
    out = [0]
    for _ in range(n - 1):
        out.append(int(g.choice(5, p=trans[out[-1]])))
    return out


class Reference:
    """The formulas of lmforge/models/ngram.py's docstring, one probability at a time, with dicts."""

    def __init__(self, toks: list[int], method: str):
        self.kn = method == "kneser_ney"
        raw = {k: Counter(tuple(toks[i:i + k]) for i in range(len(toks) - k + 1)) for k in range(1, N + 1)}
        self.c = {}
        for k in range(1, N + 1):
            if self.kn and k < N:  # continuation counts: distinct left neighbours
                self.c[k] = Counter(g[1:] for g in raw[k + 1])
            else:
                self.c[k] = raw[k]
        self.D = {k: self._discounts(self.c[k]) for k in self.c}

    def _discounts(self, counts: Counter) -> list[float]:
        n = [sum(1 for v in counts.values() if v == j) for j in (1, 2, 3, 4)]
        y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] else 0.5
        if not self.kn:
            return [min(max(y, 0.05), 0.95)]
        out = []  # D_j = j - (j+1) Y n_{j+1} / n_j; where n_j = 0 (the 6-token unigram) the one before
        for j in (1, 2, 3):
            d = j - (j + 1) * y * n[j] / n[j - 1] if n[j - 1] else (out[-1] if out else 0.5)
            out.append(min(max(d, 0.05), j))
        return out

    def d(self, k: int, count: int) -> float:
        ds = self.D[k]
        return ds[min(count, len(ds)) - 1]

    def p(self, w: int, h: tuple) -> float:
        k = len(h) + 1
        seen = {g[-1]: v for g, v in self.c[k].items() if g[:-1] == h}
        if not seen:  # an unseen context: its suffix decides
            return self.p(w, h[1:])
        total = sum(seen.values())
        left = sum(self.d(k, v) for v in seen.values()) / total
        lower = (lambda v: 1 / V) if k == 1 else (lambda v: self.p(v, h[1:]))
        if self.kn or k == 1:  # interpolated (the unigram of both: with the uniform distribution)
            return max(seen.get(w, 0) - self.d(k, seen.get(w, 1)), 0) / total * (w in seen) + left * lower(w)
        if w in seen:
            return (seen[w] - self.d(k, seen[w])) / total
        return left / (1 - sum(lower(v) for v in seen)) * lower(w)


@pytest.mark.parametrize("method", ["kneser_ney", "backoff"])
def test_matches_the_formulas_and_sums_to_one_exactly(method):
    toks = _corpus()
    model = NGramLM.fit(np.array(toks), V, order=N, method=method)
    ref = Reference(toks, method)
    for k in (1, 2, 3):
        assert_rel_close(model.config.discounts[str(k)], ref.D[k], F64)
    assert ref.D[3] != [0.5] * len(ref.D[3]) and ref.D[2] != [0.5] * len(ref.D[2])  # the formula, not the fallback
    probe = [0, 3, 3, 1, 5, 2, 4, 4, 0, 5, 5, 1, 2]  # seen and unseen contexts
    with torch.no_grad():
        p = model.probs(torch.tensor([probe]))[0]
    assert_rel_close(p.sum(-1), torch.ones(len(probe), dtype=torch.float64), F64)
    assert (p > 0).all()
    for t in range(len(probe)):
        h = tuple(probe[max(0, t - N + 2):t + 1])
        want = torch.tensor([ref.p(w, h) for w in range(V)], dtype=torch.float64)
        assert_rel_close(p[t], want, F64, msg=f"{(t, h)}")
    logp = model(torch.tensor([probe]))
    assert logp.dtype == torch.float32
    assert_rel_close(logp.exp(), p.unsqueeze(0))


def test_scored_by_the_perplexity_eval_saved_and_loaded(tmp_path):
    tok = CharTokenizer()  # teenyGPT's: a real tokenizer with a small vocabulary
    text = lmforge.data.read_work(lmforge.data.corpus_works("test")[0])[:3000]
    results = {}
    for order in (1, 4):
        llm = fit_ngram(tok, "shakespeare", order=order)
        results[order] = perplexity(llm, text, max_length=64, stride=32)
    r = results[4]
    # the eval's number is the model's own mean log-probability of each next token
    ids = tok.encode(tok.normalize(text), add_special_tokens=True)
    with torch.no_grad():
        lp = llm.model(torch.tensor([ids]))[0, :-1].gather(1, torch.tensor(ids[1:])[:, None])
    assert r.nll == pytest.approx(-lp.double().mean().item(), rel=1e-5)
    assert results[4].perplexity < results[1].perplexity * 0.6  # context helps a lot on real text
    assert r.bits_per_byte == pytest.approx(r.nll * r.tokens / math.log(2) / r.bytes)
    llm.save(tmp_path / "kn4")
    back = lmforge.load(tmp_path / "kn4")
    x = torch.tensor([ids[:100]])
    assert torch.equal(back.model(x), llm.model(x)) and back.tokenizer.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError, match="n-gram model.*cannot generate"):
        back.generate("to be")


def test_cli_fits_and_eval_scores(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    CharTokenizer().save(tok_dir)
    out = tmp_path / "bo3"
    assert main(["ngram", str(tok_dir), "--output", str(out), "--order", "3",
                 "--method", "backoff"]) == 0
    assert json.loads((out / "config.json").read_text())["method"] == "backoff"
    assert main(["eval", "perplexity", "--model", str(out), "--data", "shakespeare:macbeth",
                 "--max-tokens", "2000", "--output", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert 1 < r["perplexity"] < 29 and r["tokens"] == 1999


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown n-gram method 'katz'"):
        NGramLM.fit(np.arange(10), 10, method="katz")
    with pytest.raises(ConfigError, match="lower the order"):
        NGramLM.fit(np.arange(10), 50000, order=5)
    with pytest.raises(ConfigError, match="another tokenizer"):
        NGramLM.fit(np.array([1, 2, 300]), 256)
    model = NGramLM.fit(np.array(_corpus()), V, order=2)
    with pytest.raises(ConfigError, match=r"must lie in \[0, 6\)"):
        model(torch.tensor([[1, 7]]))
    lmforge.llm.LLM(model).save(tmp_path / "m")
    (tmp_path / "m" / "ngram.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(FormatError, match="corrupt"):
        lmforge.load(tmp_path / "m")
    with pytest.raises(ConfigError, match="tokenizer nowhere: no such folder"):
        ngram("nowhere", str(tmp_path / "x"))
