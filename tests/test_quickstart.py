"""`lmforge quickstart`, reduced: tokenizer + data + a few steps end to end; the folder loads and generates."""

from __future__ import annotations

import re

import pytest

import lmforge
from lmforge.cli import main


@pytest.mark.slow
def test_reduced_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--steps", "6", "--out", str(out), "--vocab-size", "400", "--no-progress",
                 "--set", "model.n_layer=2", "model.block_size=64", "train.batch_size=8", "train.eval_batches=2",
                 "run.sample_tokens=12", "optim.lr=1e-2"])
    assert code == 0
    text = capsys.readouterr().out
    before = float(re.search(r"before training: val loss ([\d.]+)", text).group(1))
    after = float(re.search(r"after \d+ steps .*val loss ([\d.]+)", text).group(1))
    assert after < before
    assert "temperature 0.1" in text and "temperature 1.0" in text
    llm = lmforge.load(out / "model")
    assert llm.tokenizer.vocab_size <= 400 and llm.config.n_layer == 2
    assert isinstance(llm.generate("Romeo.\n", max_new_tokens=8, temperature=1.0, seed=0), str)
    assert (out / "curves.png").is_file() and (out / "metrics.jsonl").is_file()


@pytest.fixture
def no_native_bf16(monkeypatch):
    """The CPU measured as emulating bf16 (an AVX2-only machine), whatever this one is."""
    from lmforge import precision

    monkeypatch.delenv("LMFORGE_BF16_NATIVE", raising=False)
    saved = precision._MEASURED
    precision._reset_for_tests({"bf16_native": False, "bf16_gflops": 1.2, "fp32_gflops": 43.0, "ratio": 0.028,
                                "threshold": 0.8, "source": "measured"})
    yield
    precision._reset_for_tests(saved)


def _small_quickstart(out, *extra):
    return main(["quickstart", "--steps", "2", "--out", str(out), "--vocab-size", "300", "--no-progress",
                 *extra, "--set", "model.n_layer=1", "model.block_size=32", "train.eval_batches=1", "run.samples=0",
                 "run.sample_tokens=4"])


@pytest.mark.slow
def test_quickstart_trains_in_fp32_without_native_bf16_and_keeps_an_explicit_bf16(tmp_path, capsys, no_native_bf16):
    import yaml

    from lmforge import precision

    assert _small_quickstart(tmp_path / "auto") == 0
    err = capsys.readouterr().err
    assert "auto -> float32" in err and "no native bf16" in err
    t = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]
    assert t["dtype"] == "float32" and t["batch_size"] == 8  # fp32's smaller batch: >= 300 steps in the budget

    with pytest.warns(precision.SlowPrecisionWarning, match="bfloat16 kept as asked"):
        assert _small_quickstart(tmp_path / "bf16", "--dtype", "bfloat16") == 0
    t = yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["train"]
    assert t["dtype"] == "bfloat16" and t["batch_size"] == 16
