"""bf16 by default only where the CPU computes it natively (measured), and MFU that never passes 100%."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers.tiny import tiny_llm

import lmforge
from lmforge import kernels, precision
from lmforge.train import CausalLM, OptimConfig, TokenWindows, TrainConfig, Trainer
from lmforge.train import metrics as metrics_mod
from lmforge.train.recipe import from_dict

ROOT = Path(__file__).resolve().parents[1]
NOT_NATIVE = {"bf16_native": False, "bf16_gflops": 1.2, "fp32_gflops": 43.0, "ratio": 0.028, "threshold": 0.8,
              "cpu_capability": "AVX2", "source": "measured"}
NATIVE = {**NOT_NATIVE, "bf16_native": True, "bf16_gflops": 171.0, "fp32_gflops": 98.0, "ratio": 1.74}


@pytest.fixture
def cpu_says(monkeypatch):
    """Pretend the measurement said native (True) or emulated (False); the real one comes back after."""
    monkeypatch.delenv("LMFORGE_BF16_NATIVE", raising=False)
    saved = precision._MEASURED

    def say(native: bool):
        precision._reset_for_tests(NATIVE if native else NOT_NATIVE)

    yield say
    precision._reset_for_tests(saved)


def test_measurement_reports_both_speeds_and_is_cached():
    saved = precision._MEASURED
    try:
        precision._reset_for_tests()
        r = precision.bf16_report()
        assert set(r) >= {"bf16_native", "bf16_gflops", "fp32_gflops", "ratio", "threshold", "source"}
        if r["source"] == "measured":
            assert r["bf16_gflops"] > 0 and r["fp32_gflops"] > 0
            assert r["bf16_native"] == (r["bf16_gflops"] >= r["threshold"] * r["fp32_gflops"])
        assert precision.bf16_report() == r  # once per process
        assert precision.bf16_native() is r["bf16_native"]
    finally:
        precision._reset_for_tests(saved)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction-set switches")
def test_an_avx2_only_cpu_measures_as_not_native():
    # torch and oneDNN held to AVX2 emulate bf16 (~25x slower than fp32 here, against a 0.8 threshold)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env.pop("LMFORGE_BF16_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", "import json; from lmforge.precision import bf16_report; "
                          "print(json.dumps(bf16_report()))"], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bf16_native"] is False and r["source"] == "measured", r
    assert r["ratio"] < 0.8


def test_env_override_skips_the_measurement(monkeypatch, cpu_says):
    cpu_says(False)
    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv("LMFORGE_BF16_NATIVE", value)
        assert precision.bf16_native() is want and precision.bf16_report()["source"].startswith("env")
    monkeypatch.delenv("LMFORGE_BF16_NATIVE")
    assert precision.bf16_native() is False


def test_auto_follows_the_cpu_and_explicit_bf16_is_kept_with_a_warning(cpu_says, capsys):
    cpu_says(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.train_dtype("auto") == "bfloat16" and precision.train_dtype(None) == "bfloat16"
        assert precision.train_dtype("bfloat16") == "bfloat16" and precision.train_dtype("float32") == "float32"
    assert capsys.readouterr().err == ""

    cpu_says(False)
    assert precision.train_dtype("auto") == "float32"
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "auto -> float32" in note and "no native bf16" in note
    assert precision.train_dtype("auto") == "float32" and capsys.readouterr().err == ""  # once per process
    with pytest.warns(precision.SlowPrecisionWarning, match="bfloat16 kept as asked.*slower"):
        assert precision.train_dtype("bfloat16") == "bfloat16"
    assert precision.train_dtype("float32") == "float32"


def _trainer(dtype, run_dir=None, **kw):
    model = tiny_llm("llama", vocab_size=29, block_size=32, train=True)
    toks = (torch.arange(4000) * 7 % 27 + 1).numpy().astype("uint16")
    tc = TrainConfig(max_steps=3, batch_size=4, progress=False, eval_every=0, checkpoint_every=0, dtype=dtype, **kw)
    return Trainer(model, CausalLM(), TokenWindows(toks, 4, 32, val_tokens=toks[:1000]), tc,
                   OptimConfig(lr=3e-3, warmup_steps=1), run_dir=run_dir)


def test_trainer_resolves_auto_and_keeps_explicit_bf16(cpu_says, capsys):
    cpu_says(False)
    tr = _trainer("auto", peak_flops=1e11)
    assert tr.cfg.dtype == "float32" and not tr._amp
    assert "auto -> float32" in capsys.readouterr().err
    with pytest.warns(precision.SlowPrecisionWarning):
        tr = _trainer("bfloat16", peak_flops=1e11)
    assert tr.cfg.dtype == "bfloat16" and tr._amp

    cpu_says(True)
    tr = _trainer("auto", peak_flops=1e11)
    assert tr.cfg.dtype == "bfloat16" and tr._amp
    assert _trainer("float32", peak_flops=1e11).cfg.dtype == "float32"  # an explicit float32 stays


def test_recipes_take_auto_and_shipped_ones_use_it(cpu_says):
    r = from_dict({"model": {"preset": "tiny-llama"}, "train": {"dtype": "auto"}})
    assert r.train.dtype == "auto"
    for rel in ("quickstart.yaml", "lstm.yaml", "gpt2-124m/pretrain.yaml", "llama-110m/pretrain.yaml"):
        assert "dtype: bfloat16" not in (ROOT / "recipes" / rel).read_text(), rel


def test_mfu_is_clamped_and_bf16_autocast_takes_the_faster_peak(monkeypatch):
    assert metrics_mod.mfu_ratio(1e6, 1e4, 1e9) == 1.0  # 10 GFLOP/s achieved against a 1 GFLOP/s peak
    assert metrics_mod.mfu_ratio(1e6, 1e3, 1e10) == pytest.approx(0.1)
    assert metrics_mod.mfu_ratio(None, 1e3, 1e10) == 0.0 and metrics_mod.mfu_ratio(1e6, 1e3, None) == 0.0
    # an AVX2 CPU: bf16 emulated at ~0.5 GFLOP/s, fp32 at ~40; autocast runs much of its work in fp32
    peaks = {torch.float32: 4e10, torch.bfloat16: 5e8}
    monkeypatch.setattr(metrics_mod, "peak_flops", lambda dtype=torch.float32, device="cpu": peaks[dtype])
    assert metrics_mod.train_peak_flops("bfloat16") == 4e10 and metrics_mod.train_peak_flops("float32") == 4e10
    peaks = {torch.float32: 2e11, torch.bfloat16: 8e11}  # native: the bf16 peak
    assert metrics_mod.train_peak_flops("bfloat16") == 8e11


def test_mfu_stays_within_100_percent_in_a_run(cpu_says, monkeypatch, tmp_path):
    cpu_says(False)
    # the peaks a slow, emulated bf16 measures: far below what the step reaches
    monkeypatch.setattr(metrics_mod, "peak_flops", lambda dtype=torch.float32, device="cpu": 1e3)
    with pytest.warns(precision.SlowPrecisionWarning):
        tr = _trainer("bfloat16", run_dir=tmp_path)
    tr.fit()
    rows = [r for r in tr.metrics.rows() if r.get("split") == "train"]
    assert rows and all(0.0 < r["mfu"] <= 1.0 for r in rows)


def test_peak_cache_key_tells_cpus_and_instruction_sets_apart(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = metrics_mod._peak_key(torch.bfloat16, "cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert metrics_mod._peak_key(torch.bfloat16, "cpu") != native  # an emulated run keeps its own peak
    assert kernels.cpu_model() in native


def test_measure_peak_flops_shrinks_for_a_slow_dtype(monkeypatch):
    sizes = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        sizes.append(a.shape[0])
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    metrics_mod.measure_peak_flops(torch.float32, n=1536, seconds=1e-6)  # any speed is "too slow" for that
    assert max(sizes) == 256


def _bf16_folder(tmp_path):
    torch.manual_seed(0)
    llm = lmforge.load("preset:tiny-llama")
    return llm.save(tmp_path / "m", dtype="bfloat16")


def test_bf16_weights_load_as_float32_where_bf16_is_emulated(cpu_says, tmp_path, capsys):
    folder = _bf16_folder(tmp_path)
    cpu_says(True)
    assert lmforge.load(folder).model.tok_emb.weight.dtype == torch.bfloat16  # as stored
    cpu_says(False)
    llm = lmforge.load(folder)
    assert llm.model.tok_emb.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in llm.model.parameters())
    assert "loading them as float32" in capsys.readouterr().err
    with pytest.warns(precision.SlowPrecisionWarning):
        assert lmforge.load(folder, dtype="bfloat16").model.tok_emb.weight.dtype == torch.bfloat16
    assert lmforge.load(folder, dtype="float32").model.tok_emb.weight.dtype == torch.float32
