"""teenyGPT: the recipe, its 1,089,181 parameters, real passages, and masked/unmasked metrics by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.models import DecoderLM
from lmforge.tokenizers import CharTokenizer
from lmforge.train import CausalLM, OptimConfig, PaddedSequences, TrainConfig, Trainer
from lmforge.train.recipe import load_recipe
from lmforge.train.teeny import passage_sequences, sequence_report

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "teenygpt.yaml"


def test_recipe_matches_the_seed():
    r = load_recipe(RECIPE)
    cfg = r.model_config(vocab_size=CharTokenizer().vocab_size)
    assert DecoderLM(cfg).num_params() == 1_089_181
    assert cfg.norm.placement == "post" and cfg.block_size == 150 and cfg.vocab_size == 29
    assert r.optim.lr == 1e-3 and r.train.batch_size == 32 and r.train.patience == 5
    assert r.train.loss_reduction == "sequence_sum" and r.data.kind == "passages" and r.data.max_chars == 149


def test_passages_are_bos_text_and_padding():
    tok = CharTokenizer()
    seqs = passage_sequences(tok, split="val", max_chars=149)
    assert seqs.shape[1] == 150 and len(seqs) > 1000
    assert (seqs[:, 0] == tok.bos_id).all()
    lengths = (seqs != tok.pad_id).sum(1)
    assert lengths.max() <= 150
    # right padding only: no text after the first pad
    first_pad = torch.where(seqs == 0, torch.arange(150), 150).min(1).values
    assert (first_pad == lengths).all()
    text = tok.decode(seqs[0].tolist())
    assert text and set(text) <= set("abcdefghijklmnopqrstuvwxyz ")


@pytest.mark.slow
def test_a_few_steps_on_real_passages_lower_the_loss():
    tok = CharTokenizer()
    seqs = passage_sequences(tok, split="train")[:128]
    torch.manual_seed(0)
    model = DecoderLM(load_recipe(RECIPE).model_config(vocab_size=29))
    data = PaddedSequences(seqs, 8, pad_id=0, seed=0, val_seqs=seqs[:32])
    tr = Trainer(model, CausalLM("sequence_sum"), data,
                 TrainConfig(max_steps=8, batch_size=8, eval_every=0, progress=False, peak_flops=1e11),
                 OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    before = tr.evaluate()
    res = tr.fit()
    assert res.step == 8 and res.val["loss"] < before["loss"] - 10  # nats per sequence
    assert data.epoch == 0 and data.index == 8 * 8


class _Fixed(torch.nn.Module):
    """Logits that prefer token 1 ('a') at every position: log-probs lp = log_softmax([0, 2, 0, ...])."""

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, 29)
        logits[..., 1] = 2.0
        return logits


def test_masked_and_unmasked_metrics_by_hand():
    lp = torch.log_softmax(torch.tensor([0.0, 2.0] + [0.0] * 27), -1)
    lp_a, lp_other = lp[1].item(), lp[0].item()
    # two sequences of length 6 (5 predicted positions): BOS a b pad pad pad / BOS a a a a a
    seqs = torch.tensor([[28, 1, 2, 0, 0, 0], [28, 1, 1, 1, 1, 1]])
    r = sequence_report(_Fixed(), seqs, pad_id=0)
    # seq 1 targets: a, b, pad, pad, pad; masked keeps a, b, first pad (inputs BOS, a, b)
    # seq 2 targets: a x 5, all counted
    nll_1_masked = -(lp_a + lp_other + lp_other)
    nll_1_unmasked = -(lp_a + 4 * lp_other)
    nll_2 = -5 * lp_a
    assert r["nll_per_seq_masked"] == pytest.approx((nll_1_masked + nll_2) / 2)
    assert r["nll_per_seq_unmasked"] == pytest.approx((nll_1_unmasked + nll_2) / 2)
    assert r["acc_masked"] == pytest.approx((1 + 5) / (3 + 5))  # 'a' right once in seq 1, always in seq 2
    assert r["acc_unmasked"] == pytest.approx((1 + 5) / 10)
    assert r["nll_per_token_masked"] == pytest.approx((nll_1_masked + nll_2) / 8)
    assert r["ppl_masked"] == pytest.approx(math.exp(r["nll_per_token_masked"]))


@pytest.mark.slow
def test_pretrain_teenygpt_recipe_cli(tmp_path, capsys):
    run = tmp_path / "teeny"
    code = main(["pretrain", "--config", str(RECIPE), "--set", "train.max_steps=4", "train.batch_size=8",
                 "data.max_sequences=64", f"run.dir={run}", "run.samples=1", "run.sample_tokens=20",
                 "train.progress=false", "train.eval_every=2", "train.checkpoint_every=2", "train.threads=0"])
    assert code == 0
    report = json.loads((run / "test_metrics.json").read_text())
    test = report["test"]
    assert test["sequences"] == 64 and test["nll_per_seq_unmasked"] > test["nll_per_seq_masked"] > 0
    assert 0 <= test["acc_masked"] <= 1 and 0 <= test["acc_unmasked"] <= 1
    assert set(report["samples"]) == {"0.1", "1.0"}
    out = capsys.readouterr().out
    assert "NLL/seq masked" in out and "sample (temperature 0.1)" in out
    import lmforge

    llm = lmforge.load(run / "best")
    assert llm.model.num_params() == 1_089_181
    assert set(llm.generate("", max_new_tokens=10, temperature=1.0, seed=0)) <= set("abcdefghijklmnopqrstuvwxyz ")
