"""Transformer-XL (Dai et al. 2019): segment recurrence with relative positions. Memory across segments equals one
pass over the concatenation under the window the memory leaves visible; cached decoding equals the full pass;
segment-recurrent training carries memory and learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from helpers.tiny import tiny_llm

from lmforge.errors import ConfigError
from lmforge.models import DecoderLM, make_model
from lmforge.presets import get_preset
from lmforge.train import OptimConfig, TrainConfig, Trainer
from lmforge.train.segments import SegmentLM, StreamSegments


def _model(mem_len: int) -> DecoderLM:
    return tiny_llm("xl", **{"xl.mem_len": mem_len})


def _window_mask(T: int, first: list[int]) -> torch.Tensor:
    """(1, 1, T, T): query p sees keys in [first[p], p]."""
    p, j = torch.arange(T)[:, None], torch.arange(T)[None]
    return ((j <= p) & (j >= torch.tensor(first)[:, None]))[None, None]


def test_segments_with_memory_equal_one_pass_over_the_visible_window():
    T, M, S = 12, 8, 3  # 3 segments of 12 tokens, memory of 8 hidden states per layer
    model = _model(M)
    x = torch.randint(0, 256, (2, S * T))
    with torch.no_grad():
        cache = model.new_cache(2, max_len=T)
        segs = []
        for s in range(S):
            cache.new_segment()
            segs.append(model(x[:, s * T:(s + 1) * T], cache=cache))
        # a query in segment s sees the memory (the last M slots of segment s-1) and its segment up to itself
        first = [max(0, (p // T) * T - M) for p in range(S * T)]
        concat = model(x, attn_mask=_window_mask(S * T, first).expand(2, 1, -1, -1))
        plain = model(x)
    assert_rel_close(torch.cat(segs, 1), concat, terms=256)
    assert (torch.cat(segs, 1)[:, T:] - plain[:, T:]).abs().max() > 1e-3  # the window does matter
    assert cache.layers[0].mem.shape == (2, M, 64) and not cache.layers[0].mem.requires_grad


def test_memory_holding_the_whole_previous_segment_equals_the_plain_pass():
    model = _model(16)
    x = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        cache = model.new_cache(1, max_len=16)
        a = model(x[:, :16], cache=cache)
        cache.new_segment()
        b = model(x[:, 16:], cache=cache)
        assert_rel_close(torch.cat([a, b], 1), model(x), terms=256)


def test_cached_decoding_equals_the_full_pass():
    model = _model(32)
    P, N = 10, 60
    x = torch.randint(0, 256, (2, N))
    with torch.no_grad():
        cache = model.new_cache(2)
        steps = torch.cat([model(x[:, :P], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(P, N)], 1)
        # while the text fits in the memory (33 tokens: 32 remembered + the query) it is the plain pass
        assert_rel_close(steps[:, :33], model(x[:, :33]), terms=256)
        # beyond it, each decoded token sees the memory (32 earlier tokens) and itself
        first = [0] * P + [max(0, p - 32) for p in range(P, N)]
        windowed = model(x, attn_mask=_window_mask(N, first).expand(2, 1, -1, -1))
    assert_rel_close(steps, windowed, terms=256)
    assert cache.bytes() == 2 * 2 * 32 * 64 * 4 + 2 * 2 * 32  # flat: 32 hidden states (+ validity) per layer


def test_left_padded_generation_equals_each_prompt_alone():
    from lmforge.infer.generate import GenerationConfig, generate_ids
    model = _model(8)
    gen = GenerationConfig(max_new_tokens=12, temperature=0)
    prompts = [[5, 9, 2, 7, 11, 3, 8], [3, 4]]
    alone = generate_ids(model, prompts[:1], gen) + generate_ids(model, prompts[1:], gen)
    assert generate_ids(model, prompts, gen) == alone


@pytest.mark.slow
def test_segment_recurrent_training_carries_memory_and_learns():
    from lmforge.data.corpus import corpus_works, read_work
    from lmforge.tokenizers.char import CharTokenizer
    torch.manual_seed(0)
    tok = CharTokenizer()
    text = tok.normalize(read_work(corpus_works("train")[0])[:30000])
    toks = np.asarray(tok.encode(text, add_special_tokens=False), dtype=np.uint16)
    model = DecoderLM(get_preset("tiny-xl").replace(vocab_size=tok.vocab_size, **{"xl.mem_len": 32}))
    source = StreamSegments(toks[3000:], 8, 32, val_tokens=toks[:3000], eval_batches=4)
    objective = SegmentLM()
    tc = TrainConfig(max_steps=30, batch_size=8, progress=False, peak_flops=1e11, eval_every=0, checkpoint_every=0)
    tr = Trainer(model, objective, source, tc, OptimConfig(lr=3e-3, warmup_steps=3, min_lr=3e-4))
    before = tr.evaluate()["loss"]
    tr.fit()
    after = tr.evaluate()["loss"]
    assert after < before - 0.5, (before, after)
    mem = objective._memory[True]
    assert mem.layers[0].mem.shape == (8, 32, 64)  # carried from the previous segment
    assert source.index == 30 and source.epoch == 0
    # the batches are consecutive: row b of a batch continues row b of the batch before
    s = StreamSegments(toks, 4, 16)
    a, b = s.next_batch(), s.next_batch()
    assert bool(a["reset"]) and not bool(b["reset"]) and torch.equal(a["labels"][:, -1], b["input_ids"][:, 0])


def _segment_trainer(run_dir, toks, steps: int = 8, batch: int = 4) -> Trainer:
    from lmforge.tokenizers.char import CharTokenizer
    model = tiny_llm("xl", vocab_size=CharTokenizer().vocab_size, **{"xl.mem_len": 16}, train=True)
    tc = TrainConfig(max_steps=steps, batch_size=batch, progress=False, peak_flops=1e11, eval_every=0,
                     checkpoint_every=3, keep_last=0)
    return Trainer(model, SegmentLM(), StreamSegments(toks, batch, 16), tc,
                   OptimConfig(lr=3e-3, warmup_steps=2, min_lr=3e-4), tokenizer=CharTokenizer(), run_dir=run_dir)


@pytest.mark.slow
def test_segment_memory_is_checkpointed_and_resume_is_exact(tmp_path):
    import shutil

    from lmforge.data.corpus import corpus_works, read_work
    from lmforge.tokenizers.char import CharTokenizer
    tok = CharTokenizer()
    toks = np.asarray(tok.encode(tok.normalize(read_work(corpus_works("train")[0])[:3000]),
                                 add_special_tokens=False), dtype=np.uint16)
    a = _segment_trainer(tmp_path / "a", toks)
    a.fit()
    saved = torch.load(tmp_path / "a" / "checkpoints" / "step-6" / "objective.pt", weights_only=True)
    assert saved["layers.0.mem"].shape == (4, 16, 64) and saved["layers.0.mem"].abs().sum() > 0  # a full memory
    # resume from step 6 (a copy of the run without its last checkpoint) ends bit-identical: segments 7 and 8
    # read the memory segment 6 left, not an empty one
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-8")
    b = _segment_trainer(tmp_path / "b", toks)
    assert b.fit(resume="auto").resumed_from == 6
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k
    assert torch.equal(a.objective._memory[True].layers[1].mem, b.objective._memory[True].layers[1].mem)
    # without the memory (a checkpoint from before it was saved) the run restarts it empty and drifts
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "checkpoints" / "step-8")
    c = _segment_trainer(tmp_path / "c", toks)
    c.objective.load_state_dict = lambda state: None  # noqa: E731  (what an older checkpoint gives)
    c.data.load_state_dict = lambda s, f=c.data.load_state_dict: f({k: v for k, v in s.items() if k != "reset"})
    c.fit(resume="auto")
    assert not torch.equal(a.model.blocks[0].attn.proj.weight, c.model.blocks[0].attn.proj.weight)
    # a different batch size cannot take the saved memory
    d = _segment_trainer(tmp_path / "b", toks, steps=9, batch=2)
    with pytest.raises(ConfigError, match="holds 4 streams but the batches have 2 rows; resume with .*batch_size=4"):
        d.fit(resume="auto")


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="xl.mem_len must be a non-negative integer"):
        make_model(get_preset("tiny-xl").replace(**{"xl.mem_len": -1}))
    with pytest.raises(ConfigError, match="segment recurrence needs layers that carry a memory"):
        SegmentLM().loss(DecoderLM(get_preset("tiny-llama")), {"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                                               "labels": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ConfigError, match="cannot give 4 streams"):
        StreamSegments(np.arange(50), 4, 16)


@pytest.mark.slow
def test_pretrain_cli_runs_the_segment_recipe(tmp_path):
    from pathlib import Path

    import lmforge
    from lmforge.cli import main
    from lmforge.data.corpus import read_work
    from lmforge.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    recipe = root / "recipes" / "tiny-xl" / "segments.yaml"
    src = tmp_path / "hamlet.txt"
    src.write_text(read_work("hamlet")[:40000])
    assert main(["pretrain", "--config", str(recipe), "--set", f"run.dir={tmp_path / 'run'}", f"data.source={src}",
                 "tokenizer.kind=char", "train.max_steps=3", "train.batch_size=4", "train.seq_len=32",
                 "train.progress=false", "model.n_layer=1", "train.peak_flops=1e11", "train.eval_every=3",
                 "train.eval_batches=2"]) == 0
    llm = lmforge.load(tmp_path / "run" / "model")
    assert llm.config.layer_mixers()[0][0] == "xl_attention" and len(llm.generate("to be", max_new_tokens=5)) > 0
    with pytest.raises(ConfigError, match="segment_lm and data.kind: stream go together"):
        load_recipe(recipe, ["data.kind=tokens"])
