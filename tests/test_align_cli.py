"""`lmforge align`: every method's recipe end to end on a tiny model, through the one run builder."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.llm import LLM
from lmforge.models import DecoderLM
from lmforge.presets import get_preset
from lmforge.tokenizers import train_bpe

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "assets" / "tokenizers" / "corpus.txt"
PREFS = ROOT / "tests" / "assets" / "align" / "prefs.jsonl"


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A saved tiny Llama (2 layers, d 64) with a BPE tokenizer: what the recipes' model.source loads."""
    tok = train_bpe([CORPUS], vocab_size=320)
    torch.manual_seed(0)
    cfg = get_preset("tiny-llama").replace(vocab_size=320, eos_id=tok.eos_id, bos_id=None)
    folder = tmp_path_factory.mktemp("src") / "model"
    LLM(DecoderLM(cfg), tok).save(folder)
    return folder


def _align(tmp_path, source, method, *extra, data=(f"data.source={PREFS}", "data.val_fraction=0.25")):
    run = tmp_path / method
    args = ["align", "--config", str(ROOT / "recipes" / "smollm2" / f"{method}.yaml"), "--set",
            f"model.source={source}", "train.max_steps=2", "train.batch_size=2", "train.seq_len=96",
            "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0", "train.progress=false",
            "train.peak_flops=1e11", *data, f"run.dir={run}", *extra]
    assert main(args) == 0
    return run, json.loads((run / "align_metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_preference_recipes_run_end_to_end(tmp_path, tiny_source, method):
    run, report = _align(tmp_path, tiny_source, method)
    assert report["step"] == 2 and 0.0 <= report["val"]["acc"] <= 1.0
    assert (run / "model" / "adapter_config.json").is_file()  # LoRA: the reference was adapters-off


@pytest.mark.slow
def test_dpo_recipe_on_the_shipped_preference_set(tmp_path, tiny_source):
    run, report = _align(tmp_path, tiny_source, "dpo", data=("data.max_sequences=8",))  # shakespeare-prefs
    assert report["step"] == 2 and 0.0 <= report["test"]["acc"] <= 1.0 and report["val_before"]["acc"] == 0.5


@pytest.mark.slow
def test_malformed_lines_are_reported_and_the_good_ones_kept(tmp_path, tiny_source, capsys):
    good = PREFS.read_text().splitlines()
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([good[0], "{not json", good[1], '{"prompt": "p", "chosen": "x", "rejected": "x"}',
                             *good[2:]]) + "\n")
    run, report = _align(tmp_path, tiny_source, "simpo", data=(f"data.source={f}", "data.val_fraction=0.25"))
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "line 4: chosen and rejected are identical" in err
    assert "kept 16" in err and report["step"] == 2


@pytest.mark.slow
def test_reward_then_ppo_recipes_run_end_to_end(tmp_path, tiny_source):
    run, report = _align(tmp_path, tiny_source, "reward")
    assert (run / "model" / "heads.safetensors").is_file() and "acc" in report["val"]
    run2, report2 = _align(tmp_path, tiny_source, "ppo", f"align.reward_model={run / 'model'}",
                           "align.rollout_size=4", "align.minibatch_size=2", "align.max_new_tokens=6",
                           )
    assert report2["step"] == 2 and "reward" in report2["val"] and "kl" in report2["val"]
    assert (run2 / "model" / "heads.safetensors").is_file()  # the value head


def test_bad_align_recipes_are_refused(tmp_path, tiny_source, capsys):
    base = ["align", "--config", str(ROOT / "recipes" / "smollm2" / "ppo.yaml"), "--set",
            f"model.source={tiny_source}", f"run.dir={tmp_path / 'r'}"]
    assert main([*base, "align.reward_model=null"]) == 2
    assert "needs a reward" in capsys.readouterr().err
    assert main([*base, "align.reward_model=/nonexistent"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main([*base, "--method", "dpo"]) == 2  # a PPO recipe's prompts are not preference pairs
    assert "reads data.kind: preferences" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "yes", "rejected": "yes"}\n' * 4)
    dpo = ["align", "--config", str(ROOT / "recipes" / "smollm2" / "dpo.yaml"), "--set",
           f"model.source={tiny_source}", f"run.dir={tmp_path / 'd'}", f"data.source={bad}", "train.seq_len=96"]
    assert main(dpo) == 2
    assert "chosen and rejected are identical" in capsys.readouterr().err
