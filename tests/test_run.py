"""The one run builder (lmforge.train.run): presets and pretrained sources through the same path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.llm import LLM
from lmforge.tokenizers import train_bpe
from lmforge.train.recipe import from_dict
from lmforge.train.run import build_run

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "assets" / "tokenizers" / "corpus.txt"


@pytest.fixture(scope="module")
def source_model(tmp_path_factory, tiny_llm):
    """A saved tiny Llama with its own BPE tokenizer: what `model.source` loads."""
    tok = train_bpe([CORPUS], vocab_size=320)
    model = tiny_llm("llama", seed=3, vocab_size=320, eos_id=tok.eos_id, bos_id=None, train=True)
    folder = tmp_path_factory.mktemp("src") / "model"
    LLM(model, tok).save(folder)
    return folder, model


def _recipe(run_dir, **model):
    return from_dict({"model": model, "data": {"source": str(CORPUS)},
                      "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 0,
                                "checkpoint_every": 0, "progress": False, "peak_flops": 1e11},
                      "run": {"dir": str(run_dir), "samples": 0}})


def test_pretrained_source_is_loaded_with_its_tokenizer(tmp_path, source_model):
    folder, model = source_model
    run = build_run(_recipe(tmp_path / "run", source=str(folder)))
    assert run.tokenizer.vocab_size == 320
    got = run.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    res = run.trainer.fit()
    assert res.step == 2 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "source" in (tmp_path / "run" / "config.yaml").read_text()


def test_preset_and_source_go_through_the_same_builder(tmp_path):
    run = build_run(_recipe(tmp_path / "run", preset="tiny-llama", n_layer=1))
    assert run.model.config.n_layer == 1 and run.info["params"] == run.model.num_params()


def test_source_rejects_architecture_overrides(tmp_path, source_model):
    with pytest.raises(ConfigError, match="model.source"):
        _recipe(tmp_path, source=str(source_model[0]), n_layer=3)
    with pytest.raises(ConfigError, match="data.kind must be one of"):
        from_dict({"model": {"preset": "tiny-llama"}, "data": {"kind": "nope"}})
