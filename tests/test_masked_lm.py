"""Masked-LM objective in the one trainer: mask statistics, whole-word selection, loss falls, exact resume,
and the recipe through `lmforge pretrain`."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.corpus import read_work
from lmforge.errors import ConfigError
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.tokenizers import train_bpe
from lmforge.tokenizers.wordpiece import special_id, train_wordpiece
from lmforge.train.batches import TokenWindows
from lmforge.train.masked import MaskedLM, continuation_table, mask_tokens
from lmforge.train.objectives import IGNORE_INDEX
from lmforge.train.optim import OptimConfig
from lmforge.train.recipe import load_recipe
from lmforge.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece([read_work("hamlet")], vocab_size=600)


@pytest.fixture(scope="module")
def tokens(tok):
    return np.array(tok.encode(read_work("hamlet"), add_special_tokens=False), dtype=np.int64)


def test_mask_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 512), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :8] = False  # e.g. special tokens: never selected
    x, labels = mask_tokens(ids, mask_id=3, vocab_size=1000, maskable=maskable, generator=g)
    sel = labels != IGNORE_INDEX
    assert not sel[:, :8].any()
    frac = sel.sum().item() / maskable.sum().item()
    assert abs(frac - 0.15) < 0.005  # 32,256 candidates: 3 sigma is ~0.006
    n = sel.sum().item()
    as_mask = ((x == 3) & sel).sum().item() / n
    kept = ((x == ids) & sel).sum().item() / n
    assert abs(as_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.012 and abs(1 - as_mask - kept - 0.1) < 0.012
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(x[~sel], ids[~sel])


def test_whole_word_masking_selects_every_piece(tok):
    cont = continuation_table(tok)
    text = "unquestionably the remembrancers of extraordinarily outrageous pilgrimages " * 40
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    assert cont[ids].any()  # some words are split into pieces
    x, labels = mask_tokens(ids, mask_id=special_id(tok, "mask"), vocab_size=tok.vocab_size, mask_prob=0.3,
                            continuation=cont, generator=torch.Generator().manual_seed(1))
    sel = (labels != IGNORE_INDEX)[0]
    starts = ~cont[ids[0]]
    word = starts.long().cumsum(0) - 1
    for w in word.unique():
        s = sel[word == w]
        assert s.all() or not s.any()  # a word is selected whole or not at all
    assert 0 < sel.float().mean() < 0.6


def test_mask_less_vocabulary_is_a_clear_error():
    bpe = train_bpe(["to be or not to be, that is the question"] * 20, vocab_size=300)
    with pytest.raises(ConfigError, match=r"\[MASK\].*tokenizer.kind: wordpiece"):
        MaskedLM().bind(bpe)
    with pytest.raises(ConfigError, match="replace"):
        MaskedLM(replace=[0.5, 0.1, 0.1])


def _trainer(tok, tokens, run_dir, steps=8, **kw):
    torch.manual_seed(0)
    cfg = get_preset("tiny-bert").replace(vocab_size=tok.vocab_size, block_size=32, n_layer=1)
    tc = TrainConfig(max_steps=steps, batch_size=8, progress=False, peak_flops=1e11, eval_every=steps,
                     checkpoint_every=4, keep_last=0, **kw)
    data = TokenWindows(tokens, 8, 32, seed=3, val_tokens=tokens[:3000], eval_batches=2)
    return Trainer(DecoderLM(cfg), MaskedLM().bind(tok), data, tc, OptimConfig(lr=3e-3, warmup_steps=2),
                   run_dir=run_dir)


@pytest.mark.slow
def test_loss_falls_and_resume_is_exact(tok, tokens, tmp_path):
    a = _trainer(tok, tokens, tmp_path / "a", steps=40)
    before = a.evaluate()
    # ~512 positions, ~77 selected: 4 sigma is 0.064 and 0.18 (the exact rates are tested above on 32k tokens).
    # The bound must hold for any vocabulary: WordPiece training breaks ties differently from run to run.
    assert abs(before["selected_frac"] - 0.15) < 0.065 and abs(before["mask_frac"] - 0.8) < 0.18
    assert a.evaluate()["loss"] == before["loss"]  # evaluation masks are fixed
    res = a.fit()
    # The fall depends on the vocabulary, which WordPiece training does not fix from run to run: over 40
    # trainings it was 0.43 to 1.00 (median 0.64), and one CI run saw 0.35. 0.25 still separates learning from none.
    assert res.val["loss"] < before["loss"] - 0.25
    # resume from step 36 (a copy of the run without its last checkpoint) ends bit-identical
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-40")
    b = _trainer(tok, tokens, tmp_path / "b", steps=40)
    assert b.fit(resume="auto").resumed_from == 36
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k


def test_recipe_validates_and_names_the_objective():
    r = load_recipe(ROOT / "recipes" / "tiny-bert" / "mlm.yaml", ["train.objective_args.whole_word=true"])
    assert r.train.objective == "masked_lm" and r.train.objective_args["whole_word"] is True
    assert r.tokenizer.kind == "wordpiece" and not r.model_config().attention.causal


@pytest.mark.slow
def test_pretrain_cli_runs_masked_lm(tmp_path, tok):
    import lmforge
    from lmforge.cli import main

    tok.save(tmp_path / "tok")
    src = tmp_path / "hamlet.txt"
    src.write_text(read_work("hamlet")[:60000])
    assert main(["pretrain", "--config", str(ROOT / "recipes" / "tiny-bert" / "mlm.yaml"), "--set",
                 f"run.dir={tmp_path / 'run'}", f"tokenizer.path={tmp_path / 'tok'}", f"data.source={src}",
                 "train.max_steps=4", "train.batch_size=4", "train.progress=false", "model.block_size=32",
                 "model.n_layer=1", "train.peak_flops=1e11", "train.eval_every=4",
                 "train.objective_args.whole_word=true"]) == 0
    llm = lmforge.load(tmp_path / "run" / "model")
    assert llm.config.head == "mlm" and llm.config.family == "bert"
    with pytest.raises(ConfigError, match="embed"):
        llm.generate("to be")


@pytest.mark.slow
def test_combined_objective_on_a_decoder(tok, tokens):
    from lmforge.train.masked import CombinedLM

    torch.manual_seed(0)
    cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, block_size=32, n_layer=1)
    obj = CombinedLM(alpha=0.5).bind(tok)
    tc = TrainConfig(max_steps=15, batch_size=8, progress=False, peak_flops=1e11, eval_every=15, checkpoint_every=0)
    tr = Trainer(DecoderLM(cfg), obj, TokenWindows(tokens, 8, 32, seed=3, val_tokens=tokens[:3000], eval_batches=2),
                 tc, OptimConfig(lr=3e-3, warmup_steps=2))
    before = tr.evaluate()
    assert before["loss"] == pytest.approx(before["lm_loss"] + 0.5 * before["mlm_loss"])
    res = tr.fit()
    # over 25 WordPiece vocabularies the falls were at least 0.57 (LM) and 0.43 (MLM)
    assert res.val["lm_loss"] < before["lm_loss"] - 0.3 and res.val["mlm_loss"] < before["mlm_loss"] - 0.2
    with pytest.raises(ConfigError, match="alpha"):
        CombinedLM(alpha=-1)
    r = load_recipe(ROOT / "recipes" / "tiny-llama" / "combined.yaml", ["train.objective_args.alpha=0.25"])
    assert r.train.objective == "combined_lm" and r.train.objective_args["alpha"] == 0.25


def test_permutation_masks_follow_the_order():
    from lmforge.train.permutation import permutation_masks

    rank, targets, visible = permutation_masks(4, 30, 1 / 6, torch.Generator().manual_seed(0))
    v = visible[:, 0]
    assert (targets.sum(1) == 5).all()
    assert torch.equal(targets, rank >= 25)  # the targets are the last steps of each order
    assert torch.equal(v.sum(-1), rank + 1)  # a position sees every earlier step, and itself
    for b in range(4):
        assert sorted(rank[b].tolist()) == list(range(30))
        i, j = torch.nonzero(v[b] & ~torch.eye(30, dtype=torch.bool), as_tuple=True)
        assert (rank[b][j] < rank[b][i]).all()


@pytest.mark.slow
def test_permutation_lm_trains_a_decoder(tok, tokens):
    from lmforge.train.permutation import PermutationLM

    torch.manual_seed(0)
    cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, block_size=32, n_layer=1)
    tc = TrainConfig(max_steps=15, batch_size=8, progress=False, peak_flops=1e11, eval_every=15, checkpoint_every=0)
    tr = Trainer(DecoderLM(cfg), PermutationLM().bind(tok),
                 TokenWindows(tokens, 8, 32, seed=3, val_tokens=tokens[:3000], eval_batches=2),
                 tc, OptimConfig(lr=3e-3, warmup_steps=2))
    before = tr.evaluate()
    assert tr.evaluate()["loss"] == before["loss"]  # fixed evaluation orders
    assert tr.fit().val["loss"] < before["loss"] - 0.2  # at least 0.34 over 25 WordPiece vocabularies
    with pytest.raises(ConfigError, match=r"\[MASK\]"):
        PermutationLM().bind(train_bpe(["to be or not to be"] * 20, vocab_size=300))
    r = load_recipe(ROOT / "recipes" / "tiny-llama" / "permutation.yaml")
    assert r.train.objective == "permutation_lm"
