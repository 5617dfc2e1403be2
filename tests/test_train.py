"""The training loop, objectives, optimizer/schedule, metrics and recipe validation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_rel_close
from helpers.tiny import tiny_llm

from lmforge.cli import main
from lmforge.errors import ConfigError, FormatError
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.train import (
    CausalLM,
    OptimConfig,
    TokenWindows,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    lr_at,
)
from lmforge.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _tokens(n=6000):
    # a learnable stream: a repeating pattern over 27 symbols
    return (torch.arange(n) * 7 % 27 + 1).numpy().astype("uint16")


def _trainer(run_dir=None, steps=30, objective=None, **kw):
    model = tiny_llm("llama", vocab_size=29, block_size=32, train=True)
    toks = _tokens()
    kw = {"eval_every": 10, "checkpoint_every": 10, **kw}
    tc = TrainConfig(max_steps=steps, batch_size=8, progress=False, peak_flops=1e11, **kw)
    return Trainer(model, objective or CausalLM(), TokenWindows(toks, 8, 32, val_tokens=toks[:2000]), tc,
                   OptimConfig(lr=3e-3, warmup_steps=5, min_lr=3e-4), run_dir=run_dir)


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(tmp_path):
    tr = _trainer(tmp_path, steps=30)
    before = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.step == 30 and res.stopped == "max_steps"
    assert res.val["loss"] < before - 1.0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["tok_per_s"] > 0 and 0 <= r["mfu"] for r in train)
    assert {"loss", "ppl", "acc"} <= set(next(r for r in rows if r["split"] == "val"))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    import lmforge

    llm = lmforge.load(tmp_path / "model")
    assert torch.equal(llm.model.state_dict()["tok_emb.weight"], tr.model.state_dict()["tok_emb.weight"])


def test_bf16_autocast_and_grad_accum_train():
    tr = _trainer(steps=8, dtype="bfloat16", grad_accum=2)
    before = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.step == 8 and math.isfinite(res.train_loss) and res.val["loss"] < before
    assert tr.tokens_seen == 8 * 2 * 8 * 32


def test_grad_accum_matches_one_big_batch():
    # token_mean over equal-length windows: 2 micro-batches of 4 == 1 batch of 8, up to float rounding
    x = torch.randint(1, 29, (8, 17), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    grads = []
    for parts in (1, 2):
        model = tiny_llm("gpt2", vocab_size=29, block_size=16, train=True)
        for i in range(parts):
            sl = slice(i * 8 // parts, (i + 1) * 8 // parts)
            loss, _ = CausalLM().loss(model, {k: v[sl] for k, v in batch.items()})
            (loss / parts).backward()
        grads.append(model.tok_emb.weight.grad.clone())
    assert_rel_close(grads[1], grads[0], terms=8 * 16)  # 128 tokens' contributions, summed in 2 parts


def test_schedule_warmup_then_cosine_to_min_lr():
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(1e-4)
    assert lr_at(9, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx(5.5e-4)
    assert lr_at(110, o, 110) == pytest.approx(1e-4)
    assert lr_at(500, o, 110) == pytest.approx(1e-4)
    lrs = [lr_at(s, o, 110) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(50, OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"), 100) == 1e-3


def test_weight_decay_only_on_matrices_and_fused():
    model = DecoderLM(get_preset("tiny-gpt2"))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # tied embedding counted once
    assert opt.defaults.get("fused") in (True, None)


def test_causal_lm_masking_by_hand():
    # vocab 3; logits favour token 1 everywhere; one sequence [2, 1, 0, 0] (BOS=2, pad=0)
    class Fixed(torch.nn.Module):
        def forward(self, ids):
            return torch.tensor([0.0, 1.0, 0.0]).expand(*ids.shape, 3)

    seq = torch.tensor([[2, 1, 0, 0]])
    batch = {"input_ids": seq[:, :-1], "labels": seq[:, 1:], "loss_mask": seq[:, :-1] != 0}
    lp = torch.log_softmax(torch.tensor([0.0, 1.0, 0.0]), -1)
    masked = CausalLM("sequence_sum", mask_padding=True)
    loss, stats = masked.loss(Fixed(), batch)
    # targets 1 (from BOS) and 0 (first pad, from '1') count; 0 from pad input does not
    assert loss.item() == pytest.approx(-(lp[1] + lp[0]).item())
    assert stats["tokens"].item() == 2 and stats["correct"].item() == 1
    loss_u, stats_u = CausalLM("sequence_sum", mask_padding=False).loss(Fixed(), batch)
    assert loss_u.item() == pytest.approx(-(lp[1] + 2 * lp[0]).item())
    assert stats_u["tokens"].item() == 3
    summary = CausalLM("token_mean").summarize({k: float(v) for k, v in stats.items()})
    assert summary["acc"] == 0.5 and summary["ppl"] == pytest.approx(math.exp(summary["loss"]))


@pytest.mark.slow
def test_non_finite_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    class Explodes(CausalLM):
        calls = 0

        def loss(self, model, batch):
            loss, stats = super().loss(model, batch)
            Explodes.calls += model.training  # training micro-batches only, not validation
            return (loss * float("nan") if Explodes.calls > 12 else loss), stats

    tr = _trainer(tmp_path, steps=30, objective=Explodes())
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan at step 13.*step-10.*--resume auto"):
        tr.fit()
    from lmforge.train.checkpoint import find_latest

    assert find_latest(tmp_path).step == 10
    assert not (tmp_path / "checkpoints" / "step-13").exists()


@pytest.mark.slow
def test_early_stopping_keeps_best(tmp_path):
    # nothing after the first validation "improves" by min_delta
    tr = _trainer(tmp_path, steps=200, patience=2, min_delta=100.0, eval_every=3, checkpoint_every=0)
    res = tr.fit()
    assert res.stopped == "early_stopping" and res.step == 9 and res.best_step == 3
    assert (tmp_path / "best" / "model.safetensors").is_file()


# ---- recipes and the pretrain command ------------------------------------------------------------

def _recipe(tmp_path, **sections) -> Path:
    d = {"model": {"preset": "tiny-gpt2", "block_size": 32},
         "tokenizer": {"kind": "char"},
         "data": {"source": "shakespeare"},
         "train": {"max_steps": 3, "batch_size": 2, "progress": False, "peak_flops": 1e11},
         "run": {"dir": str(tmp_path / "run"), "samples": 0}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("train.batch_size=two", "train.batch_size must be int"),
    ("train.bach_size=4", "unknown field train.bach_size (did you mean train.batch_size?)"),
    ("model.n_layr=2", "did you mean model.n_layer"),
    ("model.preset=gpt9", "unknown preset 'gpt9'"),
    ("train.dtype=fp8", "train.dtype must be one of ['float32', 'bfloat16', 'auto']"),
    ("optim.min_lr=1", "optim.min_lr must be in [0, optim.lr="),
    ("train.seq_len=64", "train.seq_len (64) exceeds the model's context"),
    ("tokenizer.path=/nonexistent/tok", "tokenizer.path /nonexistent/tok: no such tokenizer folder"),
    ("data.path=/nonexistent/data", "data.path /nonexistent/data: no such folder"),
    ("trian.max_steps=1", "unknown section 'trian' (did you mean train?)"),
    ("train.max_epochs=2", "train.max_epochs needs data.kind: passages"),
])
def test_bad_config_rejected_before_any_work(tmp_path, capsys, override, message):
    p = _recipe(tmp_path)
    with pytest.raises((ConfigError, FormatError)) as e:
        load_recipe(p, [override])
    assert message in str(e.value)
    assert main(["pretrain", "--config", str(p), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_recipe_and_data_files(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    with pytest.raises(FormatError, match="manifest.json is missing"):
        load_recipe(_recipe(tmp_path), [f"data.path={tmp_path / 'd'}"])


def test_overrides_types_and_recipe_files_load():
    r = load_recipe(ROOT / "recipes" / "gpt2-124m" / "pretrain.yaml", ["optim.lr=1e-3", "model.n_layer=2"])
    assert r.optim.lr == 1e-3 and isinstance(r.optim.lr, float) and r.model_config().n_layer == 2
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        load_recipe(path)  # every shipped recipe validates


@pytest.mark.slow
def test_pretrain_cli_end_to_end(tmp_path, capsys):
    p = _recipe(tmp_path, train={"max_steps": 6, "eval_every": 3, "checkpoint_every": 3})
    assert main(["pretrain", "--config", str(p), "--set", "model.n_layer=1", "run.samples=1",
                 "run.sample_tokens=8"]) == 0
    run = tmp_path / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["n_layer"] == 1 and cfg["model"]["vocab_size"] == 29 and cfg["train"]["max_steps"] == 6
    assert (run / "checkpoints" / "step-6" / "state.json").is_file()
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["step"] == 6 and "test" in report and len(report["samples"]["0.1"]) == 1
    # a finished run resumes to nothing new; a fresh start in the same folder is refused
    assert main(["pretrain", "--config", str(p), "--set", "model.n_layer=1", "--resume", "auto"]) == 0
    assert main(["pretrain", "--config", str(p), "--set", "model.n_layer=1"]) == 2
    assert "--resume auto" in capsys.readouterr().err


_FAULTS_SCRIPT = """
import resource, sys, torch
from lmforge.train.allocator import keep_freed_memory
print(keep_freed_memory())
for i in range(12):
    if i == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 1024 * 1024)  # 64 MiB, allocated and freed like a step's activations
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


_BOUNDED_SCRIPT = """
import torch
from lmforge.train.allocator import allocator_mode, bound_freed_memory, keep_freed_memory

def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

print(keep_freed_memory(), allocator_mode())
x = torch.ones(16 * 1024 * 1024)  # 64 MiB: kept on the heap after del
del x
kept = rss_mb()
print(bound_freed_memory(), allocator_mode())
bounded = rss_mb()  # the freed heap handed back
x = torch.ones(16 * 1024 * 1024)
during = rss_mb()
del x
print(kept, bounded, during, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
@pytest.mark.slow
def test_bounded_memory_hands_large_freed_buffers_back():
    out = subprocess.run([sys.executable, "-c", _BOUNDED_SCRIPT], env={**os.environ, "LMFORGE_KEEP_MEMORY": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:4] == ["True", "keep", "True", "bounded"]
    kept, bounded, during, after = map(float, out[4:])
    assert kept - bounded > 48  # switching to bounded returned the 64 MiB the heap was keeping
    assert during - after > 48  # and a large buffer now goes back to the OS when freed


def test_allocator_auto_bounds_memory_for_qlora_only():
    from lmforge.adapt import apply_qlora
    from lmforge.train.allocator import allocator_for

    model = DecoderLM(get_preset("tiny-llama"))
    assert allocator_for("auto", model) == "keep" and allocator_for("system", model) == "system"
    apply_qlora(model, r=4, alpha=8, target_modules=["q_proj"])
    assert allocator_for("auto", model) == "bounded" and allocator_for("keep", model) == "keep"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
@pytest.mark.slow
def test_keep_freed_memory_stops_refaulting_large_buffers():
    def run(env_value):
        env = {**os.environ, "LMFORGE_KEEP_MEMORY": env_value}
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", int(out[1])

    applied, kept_faults = run("1")
    off, default_faults = run("0")
    assert applied and not off
    pages = 4 * 16 * 1024 * 1024 // 4096  # one 64 MiB buffer in 4 KiB pages
    # 10 measured allocations. Kept: the same pages come back (at most a stray regrowth of the heap, when
    # alignment makes a request a little larger than the freed block); default: every buffer mapped afresh.
    assert kept_faults < 2 * pages
    assert default_faults > 4 * max(kept_faults, pages // 4)
