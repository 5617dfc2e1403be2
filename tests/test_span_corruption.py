"""T5's pieces beyond the model: the Unigram (SentencePiece-style) tokenizer with sentinels, the span-corruption
objective (statistics, loss falls, exact resume, the recipe through `lmforge pretrain`), and text generation
with an encoder-decoder."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import lmforge
from lmforge.data.corpus import read_work
from lmforge.errors import ConfigError
from lmforge.models import make_model
from lmforge.presets import get_preset
from lmforge.tokenizers import load_tokenizer, train_bpe
from lmforge.tokenizers.unigram import sentinel_ids, train_unigram
from lmforge.train.batches import TokenWindows
from lmforge.train.optim import OptimConfig
from lmforge.train.recipe import load_recipe
from lmforge.train.span import SpanCorruption, corrupt_spans, noise_mask, span_counts
from lmforge.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return train_unigram([read_work("hamlet")[:80000]], vocab_size=700, sentinels=20)


@pytest.fixture(scope="module")
def tokens(tok):
    return np.array(tok.encode(read_work("hamlet"), add_special_tokens=False), dtype=np.int64)


def test_unigram_tokenizer_has_t5s_layout_and_matches_transformers(tok, tmp_path):
    assert (tok.pad_id, tok.eos_id, tok.token_to_id("<unk>")) == (0, 1, 2)
    s = sentinel_ids(tok)
    assert len(s) == 20 and s[0] == tok.vocab_size - 1 and s == sorted(s, reverse=True)  # <extra_id_0> on top
    text = "Whether 'tis nobler in the mind to suffer <extra_id_0> of outrageous fortune"
    ids = tok.encode(text)
    assert ids[-1] == tok.eos_id and s[0] in ids  # </s> appended; a sentinel is one token
    assert tok.decode(ids, skip_special_tokens=True).split() == text.replace("<extra_id_0>", "").split()
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")  # a Unigram tokenizer.json through the one HF loader
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for t in (text, "O, that this too too solid flesh would melt", "Ünïcödé and  spaces\tand tabs"):
        assert again.encode(t) == tok.encode(t) == ref(t)["input_ids"]
    with pytest.raises(ConfigError, match="vocab_size"):
        train_unigram(["a b c"], vocab_size=110, sentinels=100)


def test_noise_mask_statistics():
    g = torch.Generator().manual_seed(0)
    for T in (64, 128, 512):
        noise = noise_mask(64, T, generator=g)
        n_noise, n_spans = span_counts(T)
        assert (noise.sum(1) == n_noise).all()  # the same count in every row
        starts = noise & ~torch.nn.functional.pad(noise[:, :-1], (1, 0))
        assert (starts.sum(1) == n_spans).all()
        assert abs(noise.float().mean().item() - 0.15) <= 0.5 / T  # density, up to rounding
        assert abs(n_noise / n_spans - 3.0) <= 0.6  # mean span length
        assert not noise[:, 0].any()  # a clean run comes first, as in T5
    # span lengths vary (not all 3): spans are placed at random, not on a grid
    edges = torch.nonzero(torch.diff(noise[0].long(), prepend=torch.tensor([0]), append=torch.tensor([0])))[:, 0]
    assert len(set(torch.diff(edges)[::2].tolist())) > 1


def test_corruption_keeps_every_token_once(tok):
    ids = torch.tensor([tok.encode(read_work("hamlet")[5000:9000], add_special_tokens=False)[:128]] * 4)
    obj = SpanCorruption().bind(tok)
    src, tgt, noise = obj.corrupt(ids, torch.Generator().manual_seed(3))
    s = torch.tensor(sentinel_ids(tok))
    n_noise, n_spans = span_counts(128)
    assert src.shape == (4, 128 - n_noise + n_spans + 1) and tgt.shape == (4, n_noise + n_spans + 1)
    for b in range(4):  # filling each sentinel of the input with its span gives the text back
        spans, cur = {}, None
        for t in tgt[b, :-1].tolist():
            if t in s:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        filled = [x for t in src[b, :-1].tolist() for x in (spans[t] if t in s else [t])]
        assert filled == ids[b].tolist()
    assert (src[:, -1] == tok.eos_id).all() and (tgt[:, -1] == tok.eos_id).all()
    bpe = train_bpe(["to be or not to be"] * 20, vocab_size=300)
    with pytest.raises(ConfigError, match="sentinel"):
        SpanCorruption().bind(bpe)
    with pytest.raises(ConfigError, match="seq_len"):
        obj.corrupt(torch.zeros(1, 2000, dtype=torch.long))  # 100 spans, 20 sentinels
    with pytest.raises(ConfigError, match="encoder-decoder"):
        obj.loss(make_model(get_preset("tiny-llama")), {"input_ids": ids})
    assert corrupt_spans(ids, noise, s)[0].shape[1] == src.shape[1] - 1  # no EOS without an eos_id


def _trainer(tok, tokens, run_dir, steps):
    torch.manual_seed(0)
    cfg = get_preset("tiny-t5").replace(vocab_size=tok.vocab_size, n_layer=1, encoder_layers=1, block_size=48)
    tc = TrainConfig(max_steps=steps, batch_size=8, progress=False, peak_flops=1e11, eval_every=steps,
                     checkpoint_every=steps // 2, keep_last=0)
    data = TokenWindows(tokens, 8, 48, seed=3, val_tokens=tokens[:3000], eval_batches=2)
    return Trainer(make_model(cfg), SpanCorruption().bind(tok), data, tc, OptimConfig(lr=3e-3, warmup_steps=2),
                   run_dir=run_dir, tokenizer=tok)


@pytest.mark.slow
def test_loss_falls_and_resume_is_exact(tok, tokens, tmp_path):
    a = _trainer(tok, tokens, tmp_path / "a", steps=20)
    before = a.evaluate()
    assert a.evaluate()["loss"] == before["loss"]  # evaluation corruption is fixed
    assert before["noise_frac"] == pytest.approx(7 / 48) and before["mean_span"] == pytest.approx(3.5)
    res = a.fit()
    assert res.val["loss"] < before["loss"] - 1.0  # 7.24 -> 5.34 in 20 steps
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-20")
    b = _trainer(tok, tokens, tmp_path / "b", steps=20)
    assert b.fit(resume="auto").resumed_from == 10
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k
    # the trained model generates text for a prompt with a sentinel (greedy, sampling, beam: one generator)
    llm = lmforge.load(tmp_path / "a" / "model")
    assert llm.config.family == "t5"
    prompt = ["To be, or not to be, <extra_id_0> is the question", "Good night, sweet <extra_id_0>"]
    greedy = llm.generate(prompt, max_new_tokens=8, temperature=0)
    assert len(greedy) == 2 and all(isinstance(t, str) for t in greedy)
    assert llm.generate(prompt[1], max_new_tokens=8, temperature=0) == greedy[1]  # batch == alone
    assert isinstance(llm.generate(prompt[0], max_new_tokens=6, temperature=0.8, seed=1), str)
    assert isinstance(llm.generate(prompt[0], max_new_tokens=6, num_beams=3), str)
    assert "".join(llm.generate(prompt[1], max_new_tokens=8, temperature=0, stream=True)) == greedy[1]
    with pytest.raises(ConfigError, match="speculative"):
        llm.generate(prompt[0], max_new_tokens=4, prompt_lookup=True)


def test_recipe_validates(tmp_path):
    r = load_recipe(ROOT / "recipes" / "tiny-t5" / "span_corruption.yaml", ["train.objective_args.noise_density=0.3"])
    assert r.train.objective == "span_corruption" and r.tokenizer.kind == "unigram"
    assert r.model_config().is_encoder_decoder and r.train.objective_args["noise_density"] == 0.3
    from lmforge.cli import main

    assert main(["train-tokenizer", "shakespeare", "--kind", "sentencepiece", "--out", str(tmp_path / "t")]) == 2
    with pytest.raises(ConfigError, match="noise_density"):
        SpanCorruption(noise_density=1.5)


@pytest.mark.slow
def test_pretrain_cli_runs_span_corruption(tmp_path, tok):
    from lmforge.cli import main

    assert main(["train-tokenizer", "--kind", "unigram", "--vocab-size", "600", "--sentinels", "10",
                 "--out", str(tmp_path / "tok"), str(_small_corpus(tmp_path))]) == 0
    assert main(["pretrain", "--config", str(ROOT / "recipes" / "tiny-t5" / "span_corruption.yaml"), "--set",
                 f"run.dir={tmp_path / 'run'}", f"tokenizer.path={tmp_path / 'tok'}",
                 f"data.source={_small_corpus(tmp_path)}", "train.max_steps=3", "train.batch_size=4",
                 "train.progress=false", "train.seq_len=40", "model.n_layer=1", "model.encoder_layers=1",
                 "model.d_model=64", "model.mlp.hidden=128", "train.peak_flops=1e11", "train.eval_every=3"]) == 0
    llm = lmforge.load(tmp_path / "run" / "model")
    assert llm.config.is_encoder_decoder and llm.tokenizer.token_to_id("<extra_id_9>") is not None
    assert transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "run" / "model") is not None
    assert main(["generate", "Good night <extra_id_0>", "--model", str(tmp_path / "run" / "model"),
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0


def _small_corpus(tmp_path: Path) -> Path:
    src = tmp_path / "hamlet.txt"
    if not src.exists():
        src.write_text(read_work("hamlet")[:60000])
    return src
