"""Killed at every phase, resumed with `--resume auto`: the run ends byte-identical to an uninterrupted one.

Each case is a real recipe through the CLI (tiny models, a few steps, dropout on so that the RNGs matter),
run once uninterrupted and once as a chain of SIGKILLs at named phases (`lmforge.train.faults`), each
start resuming the last. The final model/ weights must be byte-identical and every checkpoint's state.json
(RNG states, data position, sha256 of weights and optimizer state, ...) equal apart from `elapsed`.
The kill right after a checkpoint is published matters most: a run resumed from there must draw the same torch
RNG stream as one that never stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.resume_kill import ROOT, Case, assert_same_run, corpus, kill_chain, launch

RECIPES = ROOT / "recipes"
PREFS = ROOT / "tests" / "assets" / "align" / "prefs.jsonl"
# every case: checkpoints at steps 2 and 4 (all kept), validation at 3 and at the end; the peak FLOP/s is
# measured (train.peak_flops unset): its benchmark draws random matrices, which must not reach the run
COMMON = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=0", "train.eval_every=3",
          "train.eval_batches=2", "train.time_budget=null", "train.patience=0", "train.progress=false",
          "train.threads=1", "run.samples=0"]
DROPOUT = ["model.embed_dropout=0.1", "model.resid_dropout=0.1"]
SMALL = ["model.n_layer=1", "model.d_model=32", "model.mlp.hidden=64", "model.block_size=32", "train.batch_size=4"]
# the one kill of a short case (teenyGPT's run is killed at every phase): right after the first checkpoint is
# published (the resumed run must redraw the same RNG stream), or mid step 3 / mid step 3's validation, after it;
# the first start begins fresh, the second resumes from step-2 and trains to the end


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, text) -> dict[str, Path]:
    """A WordPiece and a Unigram tokenizer (with sentinels), trained once and loaded by both runs of a case:
    trained on so small a corpus their merges tie, and the tokenizers library breaks ties differently from
    one process to the next; a tokenizer is an input of the run, not what this module tests."""
    from lmforge.cli import main

    root = tmp_path_factory.mktemp("tokenizers")
    for kind, extra in (("wordpiece", []), ("unigram", ["--sentinels", "10"])):
        assert main(["train-tokenizer", "--kind", kind, "--vocab-size", "320", *extra, "--out", str(root / kind),
                     str(text)]) == 0
    return {kind: root / kind for kind in ("wordpiece", "unigram")}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A saved tiny Llama with a BPE tokenizer: the pretrained model.source of the SFT and DPO cases."""
    from lmforge.llm import LLM
    from lmforge.models import DecoderLM
    from lmforge.presets import get_preset
    from lmforge.tokenizers import train_bpe

    tok = train_bpe([ROOT / "tests" / "assets" / "tokenizers" / "corpus.txt"], vocab_size=320)
    torch.manual_seed(0)
    cfg = get_preset("tiny-llama").replace(vocab_size=320, block_size=512, eos_id=tok.eos_id, bos_id=None)
    folder = tmp_path_factory.mktemp("src") / "model"
    LLM(DecoderLM(cfg), tok).save(folder)
    return folder


def _check(tmp_path: Path, case: Case, kills: list[str], resumed: list[str]) -> None:
    launch(case, tmp_path / "ref")
    assert kill_chain(case, tmp_path / "run", kills) == resumed
    assert_same_run(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_causal_lm_with_dropout_killed_at_every_phase(tmp_path):
    """teenyGPT (embedding dropout 0.1): killed mid checkpoint write, right after a checkpoint is published,
    mid-step, mid-validation, after the last checkpoint, and while the final model is written."""
    case = Case("pretrain", RECIPES / "teenygpt.yaml",
                [*COMMON, "train.max_steps=6", "train.batch_size=8", "data.max_sequences=64", "model.n_layer=2",
                 "model.mlp.hidden=128"])
    kills = ["checkpoint_write:1",  # step-2 not published: the next start is a fresh one
             "checkpoint_published:1",  # step-2 published, nothing after it
             "step:2",  # resumed from step-2: mid step 4
             "validation:1",  # resumed from step-2: mid step 3's validation
             "final_model:1"]  # resumed from step-2: step-6 (the last) published, model/ written, the end not yet
    _check(tmp_path, case, kills, ["fresh", "fresh", "step-2", "step-2", "step-2", "step-6"])


@pytest.mark.parametrize("name, kill", [("masked_lm", "checkpoint_published:1"),
                                        ("span_corruption", "checkpoint_published:1"), ("permutation_lm", "step:3")])
@pytest.mark.slow
def test_token_objectives_resume_bit_identically(tmp_path, text, tokenizers, name, kill):
    """The objectives that draw their own noise from the global RNG: masking, span corruption, permutation."""
    recipe, tok, sets = {
        "masked_lm": ("tiny-bert/mlm.yaml", "wordpiece", ["model.attention.n_head=2"]),
        "span_corruption": ("tiny-t5/span_corruption.yaml", "unigram",
                            ["train.seq_len=32", "model.encoder_layers=1", "model.attention.n_head=2"]),
        "permutation_lm": ("tiny-llama/permutation.yaml", "wordpiece",
                           ["model.attention.n_head=2", "model.attention.n_kv_head=2"]),
    }[name]
    case = Case("pretrain", RECIPES / recipe,
                [*COMMON, *SMALL, *DROPOUT, *sets, f"tokenizer.path={tokenizers[tok]}", f"data.source={text}"])
    _check(tmp_path, case, [kill], ["fresh", "step-2"])


@pytest.mark.slow
def test_transformer_xl_memory_resumes_bit_identically(tmp_path, text):
    """Transformer-XL: the segment memory carried between batches (objective.pt) and the stream position."""
    case = Case("pretrain", RECIPES / "tiny-xl" / "segments.yaml",
                [*COMMON, *SMALL, *DROPOUT, "tokenizer.kind=char", "train.seq_len=16", "model.xl.mem_len=16",
                 f"data.source={text}"])
    _check(tmp_path, case, ["checkpoint_published:1"], ["fresh", "step-2"])


@pytest.mark.slow
def test_sft_with_lora_resumes_bit_identically(tmp_path, source):
    """SFT with LoRA (dropout 0.1 on the adapters) on a pretrained source: adapter-only checkpoints."""
    case = Case("finetune", RECIPES / "smollm2-135m" / "lora.yaml",
                [*COMMON, f"model.source={source}", "adapter.dropout=0.1", "train.batch_size=2", "train.seq_len=512",
                 "data.max_sequences=16"])
    _check(tmp_path, case, ["step:3"], ["fresh", "step-2"])


@pytest.mark.slow
def test_dpo_resumes_bit_identically(tmp_path, source):
    """DPO with LoRA (dropout 0.1) against the frozen reference, on the test preference pairs."""
    case = Case("align", RECIPES / "smollm2" / "dpo.yaml",
                [*COMMON, f"model.source={source}", "adapter.dropout=0.1", "train.batch_size=2", "train.seq_len=96",
                 f"data.source={PREFS}", "data.val_fraction=0.25"])
    _check(tmp_path, case, ["validation:1"], ["fresh", "step-2"])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.distributed.is_available(),
                    reason="torchrun on Linux with torch.distributed")
def test_ddp_two_ranks_resume_bit_identically(tmp_path, text):
    """DDP under torchrun, 2 ranks (rank 0 alone benchmarks the peak FLOP/s): rank 0 killed right after a
    sharded checkpoint is published, then rank 1 alone killed mid-step."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "tiny-llama", "block_size": 32, "n_layer": 1, "embed_dropout": 0.1, "resid_dropout": 0.1},
        "tokenizer": {"kind": "char"}, "data": {"source": str(text)},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"batch_size": 2, "strategy": "ddp"}, "run": {"dir": str(tmp_path / "unused")}}))
    case = Case("pretrain", recipe, COMMON, nproc=2)
    _check(tmp_path, case, ["checkpoint_published:1@0", "step:2@1"], ["fresh", "step-2", "step-2"])
