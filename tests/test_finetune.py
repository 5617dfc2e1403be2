"""`lmforge finetune`: every recipe end to end on a tiny model, exact resume with an adapter, the task score."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.errors import ConfigError, FormatError
from lmforge.llm import LLM, load
from lmforge.models import DecoderLM
from lmforge.tokenizers import train_bpe
from lmforge.train.allocator import allocator_mode

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes" / "smollm2-135m").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, tiny_llm):
    """A saved tiny Llama with a ChatML BPE tokenizer, standing in for SmolLM2 in the recipes."""
    tok = train_bpe([ROOT / "tests" / "assets" / "tokenizers" / "corpus.txt"], vocab_size=320)
    model = tiny_llm("llama", vocab_size=320, block_size=1024, eos_id=tok.eos_id, bos_id=None, train=True)
    folder = tmp_path_factory.mktemp("src") / "tiny"
    LLM(model, tok).save(folder)
    return folder


def _sets(src, run_dir, steps=2, **extra):
    kv = {"model.source": str(src), "run.dir": str(run_dir), "train.max_steps": steps, "train.batch_size": 2,
          "train.seq_len": 640, "train.eval_every": 0, "train.eval_batches": 2, "train.checkpoint_every": 0,
          "train.progress": False, "train.peak_flops": 1e11, "train.threads": 1, "data.max_sequences": 12,
          **extra}
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_source, recipe, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "--config", str(recipe), "--set", *_sets(tiny_source, run)]) == 0
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["step"] == 2 and report["test"]["loss"] > 0
    assert report["test"]["choice_n"] == 10 and 0 <= report["test"]["choice_acc"] <= 1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert (run / "curves.png").is_file() and (run / "checkpoints" / "step-2").is_dir()
    pct = report["trainable"]["percent"]
    if recipe.stem == "full":
        assert pct == 100.0 and not (run / "model" / "adapter_config.json").exists()
    elif recipe.stem in ("adapter", "prefix", "prompt", "adalora"):  # lmforge's own adapter files beside the base
        assert 0 < pct < 50 and (run / "model" / "lmforge_adapter.json").is_file()
    elif recipe.stem == "qlora":  # r=8 on every linear layer: a large share of a d=64 model
        assert 0 < pct < 50 and (run / "model" / "adapter_config.json").is_file()
    else:
        assert 0 < pct < 10 and (run / "model" / "adapter_config.json").is_file()
        # the base in the run's model folder is the untouched source
        base, src = load_file(run / "model" / "model.safetensors"), load_file(tiny_source / "model.safetensors")
        assert all(torch.equal(base[k], src[k]) for k in src)
    assert "trainable" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_run_resumes_bit_identically(tmp_path, tiny_source, method):
    recipe = str(ROOT / "recipes" / "smollm2-135m" / f"{method}.yaml")
    a = tmp_path / "a"
    args = ["train.checkpoint_every=2", "train.keep_last=0", "adapter.dropout=0.1", "data.pack=true"]
    assert main(["finetune", "--config", recipe, "--set", *_sets(tiny_source, a, steps=4), *args]) == 0
    if os.environ.get("LMFORGE_KEEP_MEMORY", "1") != "0":  # train.allocator auto: QLoRA's point is memory
        assert allocator_mode() == ("bounded" if method == "qlora" else "keep")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for p in ("model", "checkpoints/step-4"):
        shutil.rmtree(b / p)
    assert main(["finetune", "--config", recipe, "--resume", "auto", "--set",
                 *_sets(tiny_source, b, steps=4), *args]) == 0
    wa = load_file(a / "model" / "adapter_model.safetensors")
    wb = load_file(b / "model" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the adapter-only checkpoint loads as a model: base rebuilt from its source (NF4 again for QLoRA)
    ck = a / "checkpoints" / "step-4"
    assert not (ck / "model.safetensors").exists()
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close(load(ck).model(ids), load(a / "model").model(ids), terms=256)
    # QLoRA's final model is adapter-only too (its NF4 base is rebuilt); LoRA's is whole
    assert (a / "model" / "model.safetensors").exists() == (method == "lora")
    if method == "lora":
        src = load_file(tiny_source / "model.safetensors")  # and LoRA moved only the adapter
        assert all(torch.equal(load_file(b / "model" / "model.safetensors")[k], v) for k, v in src.items())


def test_options_and_bad_input(tmp_path, tiny_source, capsys):
    bad = ROOT / "tests" / "assets" / "data" / "instruct_bad.jsonl"
    run = tmp_path / "r"
    # a user file with bad lines: they are reported, the run goes on with the good ones
    assert main(["finetune", "--method", "lora", "--model", str(tiny_source), "--data", str(bad), "--out",
                 str(run), "--set", *_sets(tiny_source, run, steps=1), "data.val_fraction=0.0",
                 "adapter.target_modules=[q_proj, v_proj]", "train.batch_size=3"]) == 0
    err = capsys.readouterr().err
    assert "skipped 5 malformed line(s), kept 3" in err and "line 2: invalid JSON" in err
    assert json.loads((run / "model" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert main(["finetune", "--method", "lora", "--model", str(tiny_source), "--set",
                 *_sets(tiny_source, tmp_path / "x"), "adapter.target_modules=[qproj]"]) == 2
    assert "match no layer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.pack: true cannot be used with adapter.method prompt"):
        from lmforge.train.finetune import finetune_recipe

        finetune_recipe(method="prompt", model=str(tiny_source), set_=["data.pack=true"])
    with pytest.raises(ConfigError, match="not a built-in set"):
        from lmforge.train.finetune import finetune_recipe

        finetune_recipe(data=str(tmp_path / "missing.jsonl"))


def test_choice_accuracy_scores_the_likeliest_option(tiny_source):
    from lmforge.data.instruct import load_splits
    from lmforge.train.finetune import choice_accuracy

    llm = load(tiny_source)
    rows = [r for r in load_splits("shakespeare-instruct")["test"] if r.get("options")][:6]
    base = choice_accuracy(llm.model, llm.tokenizer, rows)
    assert base["choice_n"] == 6
    # a row whose answer is made the only option the model can pick scores 1; a wrong answer 0
    one = [{**r, "options": [r["answer"]]} for r in rows]
    assert choice_accuracy(llm.model, llm.tokenizer, one)["choice_acc"] == 1.0
    llm.model.accepts_targets = False  # scored from full logits instead of the chunked head: the same picks
    assert choice_accuracy(llm.model, llm.tokenizer, rows) == base


@pytest.mark.slow
def test_adapter_checkpoint_holds_no_base_and_refuses_a_changed_base(tmp_path, tiny_source, capsys):
    src = tmp_path / "base"
    shutil.copytree(tiny_source, src)
    run = tmp_path / "run"
    sets = _sets(src, run, steps=2, **{"train.checkpoint_every": 1, "train.keep_last": 0})
    assert main(["finetune", "--method", "lora", "--set", *sets]) == 0
    ck = run / "checkpoints" / "step-2"
    assert not (ck / "model.safetensors").exists() and (ck / "trainable.safetensors").is_file()
    held = load_file(ck / "trainable.safetensors")
    assert held and all(".lora_" in k for k in held)  # only what trains
    base_bytes = (src / "model.safetensors").stat().st_size
    assert (ck / "trainable.safetensors").stat().st_size < base_bytes / 10
    assert sum(p.stat().st_size for p in ck.iterdir()) < base_bytes / 2  # tokenizer and optimizer included
    state = json.loads((ck / "state.json").read_text())
    assert state["base"]["source"] == str(src.resolve()) and len(state["base"]["fingerprint"]) == 32
    # the checkpoint is still a model folder: the base comes back from its source, the adapter on top
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load(ck).model(ids), load(run / "model").model(ids))
    # the base changes under the run (same shapes, other weights): resuming is refused, naming the mismatch
    torch.manual_seed(1)
    other = load(src)
    LLM(DecoderLM(other.config), other.tokenizer).save(src)
    with pytest.raises(FormatError, match="no longer the one they were trained on"):
        load(ck)
    shutil.rmtree(run / "model")
    shutil.rmtree(ck)
    capsys.readouterr()
    assert main(["finetune", "--method", "lora", "--resume", "auto", "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert "trained on another base model" in err and state["base"]["fingerprint"] in err
    assert "same shapes, different values" in err and not (run / "checkpoints" / "step-2").exists()
