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
