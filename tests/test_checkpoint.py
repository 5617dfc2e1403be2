"""Checkpoints: atomic writes, skipping damaged ones, SIGTERM, and bit-identical resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_llm

from lmforge.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# A tiny teenyGPT (embedding dropout 0.1, so the dropout RNG matters) on random padded sequences, with a
# pause per batch so that a test can kill it mid-run. Argv: run_dir max_steps resume delay.
SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    from lmforge.presets import get_preset
    from lmforge.models import DecoderLM
    from lmforge.tokenizers import CharTokenizer
    from lmforge.train import CausalLM, OptimConfig, PaddedSequences, TrainConfig, Trainer

    run_dir, max_steps, resume, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])

    class Slow(PaddedSequences):
        def next_batch(self):
            time.sleep(delay)  # wall-clock only; touches no RNG
            return super().next_batch()

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 40, (64,), generator=g)
    seqs = torch.zeros(64, 40, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        seqs[i, 0] = 28
        seqs[i, 1:n] = torch.randint(1, 28, (n - 1,), generator=g)
    torch.manual_seed(0)
    cfg = get_preset("tiny-teenygpt").replace(block_size=40)
    model = DecoderLM(cfg)
    data = Slow(seqs, 8, pad_id=0, seed=3, val_seqs=seqs[:16])
    tc = TrainConfig(max_steps=max_steps, batch_size=8, eval_every=6, checkpoint_every=4, keep_last=2,
                     threads=1, progress=False, peak_flops=1e11, seed=5)
    res = Trainer(model, CausalLM(), data, tc, OptimConfig(lr=3e-3, warmup_steps=3), run_dir=run_dir,
                  tokenizer=CharTokenizer()).fit(resume=None if resume == "none" else resume)
    sys.exit(res.exit_code)
""")


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "train_tiny.py"
    p.write_text(SCRIPT)
    return p


def _run(script: Path, run_dir: Path, steps: int, resume: str = "none", delay: float = 0.0, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMFORGE_CACHE": str(run_dir.parent / "cache")}
    return subprocess.Popen([sys.executable, str(script), str(run_dir), str(steps), resume, str(delay)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] in ("train", "val")]


def _wait_for(cond, timeout: float = 60.0) -> None:
    t_end = time.time() + timeout
    while not cond():
        if time.time() > t_end:
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    script = _script(tmp_path)
    steps = 24
    a = _run(script, tmp_path / "a", steps)
    assert a.wait(120) == 0, a.stderr.read()

    b = _run(script, tmp_path / "b", steps, delay=0.05)
    _wait_for(lambda: (tmp_path / "b" / "checkpoints" / "step-8").is_dir())
    b.send_signal(signal.SIGKILL)
    b.wait(30)
    done = [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")]
    assert done and max(done) < steps, "the run should have been killed mid-way"

    c = _run(script, tmp_path / "b", steps, resume="auto")
    out, err = c.communicate(timeout=120)
    assert c.returncode == 0, err
    assert "resumed from" in err

    wa = (tmp_path / "a" / "model" / "model.safetensors").read_bytes()
    wb = (tmp_path / "b" / "model" / "model.safetensors").read_bytes()
    assert wa == wb
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(la) == steps + steps // 6 and la == lb


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    script = _script(tmp_path)
    p = _run(script, tmp_path / "r", 200, delay=0.05)
    _wait_for(lambda: (tmp_path / "r" / "metrics.jsonl").is_file()
              and len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) >= 5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM received" in err and "--resume auto" in err
    latest = ckpt.find_latest(tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert latest is not None and latest.step == max(r["step"] for r in rows) and latest.step < 200


def _tiny_trainer(run_dir, steps=12, every=4, **train_kw):
    from lmforge.tokenizers import CharTokenizer
    from lmforge.train import CausalLM, OptimConfig, TokenWindows, TrainConfig, Trainer

    model = tiny_llm("gpt2", vocab_size=29, block_size=16, train=True)
    toks = (torch.arange(4000) % 27 + 1).numpy().astype("uint16")
    tc = TrainConfig(max_steps=steps, batch_size=4, eval_every=0, checkpoint_every=every, keep_last=0,
                     progress=False, peak_flops=1e11, **train_kw)
    return Trainer(model, CausalLM(), TokenWindows(toks, 4, 16, val_tokens=toks[:500]), tc,
                   OptimConfig(lr=1e-3, warmup_steps=2), run_dir=run_dir, tokenizer=CharTokenizer())


def test_checkpoint_contents_and_keep_last(tmp_path):
    tr = _tiny_trainer(tmp_path, steps=12, every=4)
    tr.cfg.keep_last = 2
    tr.fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [12, 8]
    folder = tmp_path / "checkpoints" / "step-12"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "state.json"} <= names
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 12 and state["complete"] is True
    assert {"torch", "python", "numpy"} <= set(state["rng"]) and "generator" in state["data"]
    assert set(state["files"]) >= {"model.safetensors", "optimizer.pt"}
    torch.load(folder / "optimizer.pt", weights_only=True)  # plain tensors and containers only
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]

    import lmforge

    llm = lmforge.load(folder)
    assert llm.model.num_params() == tr.model.num_params()


@pytest.mark.parametrize("damage", ["truncate", "state"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, damage):
    _tiny_trainer(tmp_path, steps=8, every=4).fit()
    newest = tmp_path / "checkpoints" / "step-8"
    if damage == "truncate":
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (newest / "state.json").write_text('{"step": 8, "compl')
    with pytest.warns(UserWarning, match="skipping checkpoint step-8"):
        latest = ckpt.find_latest(tmp_path)
    assert latest.step == 4

    tr = _tiny_trainer(tmp_path, steps=10, every=4)
    with pytest.warns(UserWarning, match="step-8"):
        res = tr.fit(resume="auto")
    assert res.resumed_from == 4 and res.step == 10


def test_failed_save_leaves_earlier_checkpoints_untouched(tmp_path, monkeypatch):
    tr = _tiny_trainer(tmp_path, steps=8, every=4)
    tr.fit()
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise OSError("disk full")

    tr.cfg.max_steps, tr.step = 12, 11
    monkeypatch.setattr(ckpt.torch, "save", boom)
    tr.step = 12
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint()
    assert not (tmp_path / "checkpoints" / "step-12").exists()
    after = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    assert before == after  # nothing saved was overwritten, no temp left behind
    assert ckpt.find_latest(tmp_path).step == 8


def test_fresh_run_refuses_existing_checkpoints(tmp_path):
    from lmforge.errors import ConfigError

    _tiny_trainer(tmp_path, steps=4, every=4).fit()
    with pytest.raises(ConfigError, match="--resume auto"):
        _tiny_trainer(tmp_path, steps=4, every=4).fit()


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(json.loads(json.dumps(state)))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
