"""The LSTM token mixer (the classical recurrent baseline): cached decode equals the full pass,
padding leaves the state alone, and it is torch's LSTM underneath (checked against the equations)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close
from helpers.tiny import tiny_llm

from lmforge.infer.generate import GenerationConfig, generate_ids
from lmforge.models import DecoderLM


def _model(seed: int = 0) -> DecoderLM:
    return tiny_llm("lstm", seed)


def test_cached_decode_equals_full_recompute():
    model = _model()
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :7], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(7, 40)]
    assert_rel_close(torch.cat(steps, 1), full, terms=256)


def test_the_mixer_is_the_lstm_recurrence():
    model = _model()
    mix = model.blocks[0].lstm
    C = mix.proj.in_features
    x = torch.randn(1, 12, C)
    W, U = mix.cell.weight_ih_l0, mix.cell.weight_hh_l0
    b = mix.cell.bias_ih_l0 + mix.cell.bias_hh_l0
    h = c = torch.zeros(C)
    ref = []
    for t in range(12):  # the equations of the module docstring, gates in torch's order i, f, g, o
        i, f, g, o = (W @ x[0, t] + U @ h + b).split(C)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ref.append(h)
    with torch.no_grad():
        y = mix._run(x, None, None)
    assert_rel_close(y[0], torch.stack(ref), terms=2 * 12 * C)  # 12 steps of 2 matmuls over C


def test_left_padded_batch_generates_what_each_prompt_does_alone():
    model = _model()
    prompts = [[5, 9, 2, 7, 11, 3], [8, 1]]
    gen = GenerationConfig(max_new_tokens=8, temperature=0)
    batched = generate_ids(model, prompts, gen, pad_id=0)
    alone = [generate_ids(model, [p], gen)[0] for p in prompts]
    assert batched == alone


def test_trains_one_step_with_bf16_autocast():
    model = _model().train()
    x = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    assert model.blocks[0].lstm.cell.weight_hh_l0.grad.abs().sum() > 0


@pytest.mark.slow
def test_lstm_recipe_trains_through_pretrain(tmp_path):
    """recipes/lstm.yaml through `lmforge pretrain` (shrunk: a character tokenizer, a small file, 4 steps)."""
    import lmforge
    from lmforge.cli import main
    from lmforge.data import corpus_works, read_work

    text = tmp_path / "text.txt"
    text.write_text(read_work(corpus_works("train")[0])[:20000])
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "recipes/lstm.yaml", "--set", "tokenizer.kind=char", f"data.source={text}",
                 "model.d_model=32", "train.seq_len=32", "train.max_steps=4", "train.time_budget=null",
                 "train.schedule_clock=steps", "train.eval_every=0", "train.checkpoint_every=0",
                 "train.progress=false", "train.peak_flops=1e11", "run.samples=0", f"run.dir={run}"]) == 0
    llm = lmforge.load(run / "model")
    assert llm.config.layer_mixers() == [("lstm", "none")] * 2 and llm.config.d_model == 32
    assert len(llm.generate("to be", max_new_tokens=5, temperature=0)) > 0
