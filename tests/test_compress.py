"""Pruning and distillation: exact sparsity patterns, structured pruning that shrinks and keeps what it keeps,
the distillation loss by hand, a student that learns its teacher, and the CLI end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close
from helpers.tiny import tiny_llm

from lmforge.cli import main
from lmforge.compress import (
    head_importance,
    magnitude_prune,
    prune_heads,
    prune_mlp,
    semi_structured_prune,
    sparsity_report,
)
from lmforge.compress.distill import Distill, student_from_teacher
from lmforge.compress.prune import block_linears
from lmforge.errors import ConfigError
from lmforge.llm import LLM, load
from lmforge.train import OptimConfig, TokenWindows, TrainConfig, Trainer


def _model(preset="tiny-llama", seed=0, **kw):
    return tiny_llm(preset, seed, **kw)


def test_magnitude_prune_zeroes_the_smallest_exactly():
    m = _model()
    w0 = m.blocks[0].mlp.fc.weight.clone()
    magnitude_prune(m, 0.3)
    for _, lin in block_linears(m):
        assert (lin.weight == 0).sum().item() == int(0.3 * lin.weight.numel())
    w = m.blocks[0].mlp.fc.weight
    assert w[w != 0].abs().min() >= w0[w == 0].abs().max()  # every kept weight outweighs every dropped one
    g = _model()
    magnitude_prune(g, 0.5, scope="global")
    total = sum(lin.weight.numel() for _, lin in block_linears(g))
    zeros = sum((lin.weight == 0).sum().item() for _, lin in block_linears(g))
    assert abs(zeros / total - 0.5) < 1e-3
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_prune(g, 1.0)


def test_two_four_keeps_the_two_largest_of_every_four():
    m = _model()
    w0 = m.blocks[1].attn.qkv.weight.clone()
    semi_structured_prune(m)
    for _, lin in block_linears(m):
        groups = lin.weight.view(lin.weight.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) == 2).all()
    g0, g = w0.view(w0.shape[0], -1, 4), m.blocks[1].attn.qkv.weight.view(w0.shape[0], -1, 4)
    kept = torch.topk(g0.abs(), 2, dim=-1).indices.sort(-1).values
    assert torch.equal((g != 0).nonzero()[:, -1].view(*g.shape[:2], 2), kept)
    assert abs(sparsity_report(m)["nonzero"] - sparsity_report(_model())["nonzero"]) > 0


def test_prune_heads_shrinks_and_drops_only_dead_heads():
    m = _model()  # 4 heads, 2 KV heads: two groups of two query heads
    cfg = m.config
    hs = cfg.head_dim
    with torch.no_grad():  # kill KV group 1 in every layer: its query heads' output columns are 0
        for b in m.blocks:
            b.attn.proj.weight[:, 2 * hs:] = 0
    assert (head_importance(m)[:, 1] == 0).all()
    small = prune_heads(m, keep=1).eval()
    assert small.config.n_head == 2 and small.config.n_kv_head == 1 and small.config.head_dim == hs
    assert small.num_params() < m.num_params()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert_rel_close(small(x), m(x), terms=256)  # the dropped heads contributed nothing
    with pytest.raises(ConfigError, match="must keep between 1 and 2"):
        prune_heads(m, keep=3)


def test_prune_mlp_shrinks_and_drops_only_dead_channels():
    for preset in ("tiny-llama", "tiny-gpt2"):  # gated (SwiGLU) and plain GELU MLPs
        m = _model(preset)
        h = m.config.mlp.hidden
        with torch.no_grad():
            for b in m.blocks:
                b.mlp.proj.weight[:, h // 2:] = 0  # the second half of the channels write nothing
        small = prune_mlp(m, keep=0.5).eval()
        assert small.config.mlp.hidden == h // 2 and small.num_params() < m.num_params()
        x = torch.randint(0, m.config.vocab_size, (1, 16))
        with torch.no_grad():
            assert_rel_close(small(x), m(x), terms=256, msg=preset)


def test_structured_pruning_refuses_blocks_it_does_not_know():
    moe = _model("tiny-moe")
    with pytest.raises(ConfigError, match="dense MLP"):
        prune_mlp(moe, keep=0.5)
    assert prune_heads(moe, keep=1).config.n_kv_head == 1  # its attention prunes as usual


def test_distill_loss_by_hand():
    teacher, student = _model(seed=0), _model(seed=1, n_layer=1)
    x = torch.randint(0, 256, (2, 12))
    y = torch.randint(0, 256, (2, 12))
    obj = Distill(teacher, temperature=2.0, alpha=0.7)
    loss, stats = obj.loss(student, {"input_ids": x, "labels": y})
    zt, zs = teacher(x).detach(), student(x)
    kl = F.kl_div(F.log_softmax(zs / 2, -1).flatten(0, 1), F.log_softmax(zt / 2, -1).flatten(0, 1),
                  log_target=True, reduction="batchmean")
    ce = F.cross_entropy(zs.flatten(0, 1), y.flatten())
    assert_rel_close(loss, 0.7 * 4 * kl + 0.3 * ce, terms=256)
    hid = Distill(teacher, alpha=1.0, hidden_weight=0.5)
    loss2, _ = hid.loss(student, {"input_ids": x, "labels": y})
    mse = F.mse_loss(student.hidden_states(x), teacher.hidden_states(x))
    assert_rel_close(loss2, 4 * kl + 0.5 * mse, terms=256)
    with pytest.raises(ConfigError, match="vocabulary"):
        Distill(teacher).loss(_model(vocab_size=300), {"input_ids": x, "labels": y})


def test_student_from_teacher_takes_spaced_layers():
    t = _model(n_layer=4)
    s = student_from_teacher(t, 2)
    assert s.config.n_layer == 2
    assert torch.equal(s.blocks[0].attn.qkv.weight, t.blocks[0].attn.qkv.weight)
    assert torch.equal(s.blocks[1].mlp.fc.weight, t.blocks[3].mlp.fc.weight)
    with pytest.raises(ConfigError, match="1..4 layers"):
        student_from_teacher(t, 5)


@pytest.mark.slow
def test_distillation_brings_the_student_toward_the_teacher():
    teacher = _model(n_layer=4)
    with torch.no_grad():  # a teacher with confident, structured predictions
        teacher.lm_head.weight.mul_(20)
    student = _model(seed=5, n_layer=1).train()  # a fresh student: it starts far from the teacher
    toks = torch.randint(0, 256, (4000,)).numpy()
    data = TokenWindows(toks, 8, 32, val_tokens=toks[:1000], eval_batches=2)
    tr = Trainer(student, Distill(teacher, temperature=1.0, alpha=1.0), data,
                 TrainConfig(max_steps=30, eval_every=0, progress=False, peak_flops=1e11),
                 OptimConfig(lr=3e-3, warmup_steps=3))
    before = tr.evaluate()
    after = tr.fit().val
    assert after["kl"] < 0.7 * before["kl"] and after["agreement"] > before["agreement"], (before, after)


@pytest.mark.slow
def test_prune_and_distill_cli(tmp_path, capsys):
    from lmforge.tokenizers import CharTokenizer

    tok = CharTokenizer()
    LLM(_model(vocab_size=tok.vocab_size, n_layer=2), tok).save(tmp_path / "t")
    assert main(["prune", "--model", str(tmp_path / "t"), "--method", "heads", "--keep", "0.5",
                 "--eval-tokens", "300", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["after"]["params"] < rep["before"]["params"] and rep["after"]["ppl"] > 0
    assert load(tmp_path / "p").config.n_head == 2
    assert main(["distill", "--teacher", str(tmp_path / "t"), "--layers", "1", "--steps", "4", "--batch-size", "2",
                 "--seq-len", "32", "--train-tokens", "5000", "--eval-tokens", "300",
                 "--out", str(tmp_path / "d")]) == 0
    student = load(tmp_path / "d" / "model")
    assert student.config.n_layer == 1 and "teacher" in capsys.readouterr().out
