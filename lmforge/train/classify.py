"""Task heads in the one trainer: ell_pred for sequence classification, and a real labelled task.

    ell_pred(theta, phi) = -E_{x, y} [ ln p_{theta, phi}(y | x) ]          (Tomczak, "LLMs": fine-tuning)

`SequenceClassification` is the objective: a `SequenceClassificationHead` it owns (saved as the run's
`heads.safetensors`) on the model's hidden states; `LabelledBatches` feeds (text, label) examples with
exact resume. `genre_task` is the embedded corpus's task: is a Shakespeare passage from a comedy, a tragedy or
a history (the First Folio's kinds, `lmforge.data.corpus.PLAY_KINDS`)? Plays are split whole, so no play
has passages on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.heads import SequenceClassificationHead
from lmforge.train.batches import BatchSource
from lmforge.train.objectives import Batch, Objective

KINDS = ("comedy", "tragedy", "history")
# Held-out plays for the genre task: two of each kind (the corpus's val/test works among them).
GENRE_TEST_PLAYS = ("tempest", "twelfth_night", "macbeth", "julius_caesar", "richard_ii", "henry_v")


def class_logits(model: nn.Module, head: nn.Module, batch: Batch, frozen: bool = False) -> torch.Tensor:
    """(B, n_classes) logits of `head` on the model's hidden states; `frozen` runs the model in eval mode
    without building a graph (features only)."""
    kw = {"token_type_ids": batch["token_type_ids"]} if batch.get("token_type_ids") is not None else {}
    mask = batch.get("attention_mask")
    if frozen:
        was = model.training
        model.eval()  # no dropout in a frozen encoder
        with torch.no_grad():
            h = model.hidden_states(batch["input_ids"], attention_mask=mask, **kw)
        model.train(was)
    else:
        h = model.hidden_states(batch["input_ids"], attention_mask=mask, **kw)
    return head(h, mask)


class SequenceClassification(Objective):
    """Cross-entropy of class logits from a head on the model's hidden states (ell_pred).

    The head is the objective's own module (`cls_head`): the trainer optimises it with the model and saves
    it beside the weights (`heads.safetensors`). With `freeze_encoder` only the head trains.
    Batches: input_ids, attention_mask, token_type_ids (optional), labels (B,).
    Stats: nll, examples, correct. Summaries: loss, acc.
    """

    name = "sequence_classification"

    def __init__(self, d_model: int | None = None, n_classes: int = 3, pooling: str = "mean", dropout: float = 0.1,
                 freeze_encoder: bool = False, reduction: str = "token_mean", mask_padding: bool = True):
        if n_classes < 2:
            raise ConfigError(f"sequence_classification: n_classes must be >= 2, got {n_classes}")
        self.n_classes, self.pooling, self.dropout = n_classes, pooling, dropout
        self.head = SequenceClassificationHead(d_model, n_classes, pooling, dropout) if d_model else None
        self.freeze_encoder = freeze_encoder

    def attach(self, model: nn.Module) -> SequenceClassification:
        """Build the head for `model`'s width (the run builder calls this); freeze the model if asked."""
        if self.head is None:
            self.head = SequenceClassificationHead(model.config.d_model, self.n_classes, self.pooling, self.dropout)
        if self.freeze_encoder:
            model.requires_grad_(False)
        return self

    def modules(self) -> dict[str, nn.Module]:
        """The classification head."""
        if self.head is None:
            raise ConfigError("sequence_classification: the head is built by attach(model) (the run builder does)")
        return {"cls_head": self.head}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy over the batch's examples."""
        logits = class_logits(model, self.head, batch, self.freeze_encoder)
        nll = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        n = batch["labels"].numel()
        with torch.no_grad():
            pred, gold = logits.argmax(-1), batch["labels"]
            stats = {"nll": nll.detach().double(), "examples": torch.tensor(float(n), dtype=torch.float64),
                     "correct": (pred == gold).sum().double()}
            for c in range(logits.shape[-1]):  # summable counts for macro-F1
                stats[f"tp{c}"] = ((pred == c) & (gold == c)).sum().double()
                stats[f"fp{c}"] = ((pred == c) & (gold != c)).sum().double()
                stats[f"fn{c}"] = ((pred != c) & (gold == c)).sum().double()
        return nll / n, stats

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        """loss, ppl, acc, macro_f1."""
        n = max(totals.get("examples", 0.0), 1.0)
        f1 = []
        for c in range(self.n_classes):
            tp, fp, fn = (totals.get(f"{k}{c}", 0.0) for k in ("tp", "fp", "fn"))
            f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        loss = totals["nll"] / n
        # ppl: exp of the mean cross-entropy, so reports that print a perplexity have one
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": totals["correct"] / n,
                "macro_f1": sum(f1) / len(f1)}

    def tokens(self, batch: Batch) -> int:
        """Real tokens read."""
        m = batch.get("attention_mask")
        return int(m.sum()) if m is not None else int(batch["input_ids"].numel())


class LabelledBatches(BatchSource):
    """(text, label) examples tokenized once, shuffled per epoch (seed + epoch), padded per batch."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], batch_size: int, max_length: int,
                 seed: int = 0, val: tuple[list[str], list[int]] | None = None):
        from lmforge.tokenizers.wordpiece import encode_for_encoder

        if len(texts) != len(labels) or len(texts) < batch_size:
            raise ConfigError(f"need as many labels as texts and at least one batch ({batch_size}) of them")
        self._encode = lambda t: encode_for_encoder(tokenizer, t, max_length=max_length, truncation=True)
        self.texts, self.labels, self.val = texts, torch.tensor(labels), val
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.index = 0, 0

    def _batch(self, texts: list[str], labels: torch.Tensor) -> Batch:
        b = self._encode(texts)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids,
                "labels": labels}

    def next_batch(self) -> Batch:
        """The next batch of this epoch's order."""
        if self.index + self.batch_size > len(self.texts):
            self.epoch, self.index = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(len(self.texts), generator=g)
        idx = perm[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return self._batch([self.texts[i] for i in idx], self.labels[idx])

    def state_dict(self) -> dict:
        """Epoch and position."""
        return {"kind": "labelled", "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved epoch and position."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def eval_batches(self) -> Iterator[Batch]:
        """The validation examples, in order."""
        if self.val is None:
            return
        texts, labels = self.val
        for i in range(0, len(texts), self.batch_size):
            yield self._batch(texts[i:i + self.batch_size], torch.tensor(labels[i:i + self.batch_size]))


# ---- the genre task -------------------------------------------------------------------------------

def play_passages(name: str, min_chars: int = 400, skip_chars: int = 3000) -> list[str]:
    """A play's text cut at line ends into passages of at least `min_chars` (its first `skip_chars`, the
    title page and list of persons, left out)."""
    from lmforge.data.corpus import read_work

    lines = [ln.strip() for ln in read_work(name)[skip_chars:].splitlines() if ln.strip()]
    out, cur = [], []
    for ln in lines:
        cur.append(ln)
        if sum(len(x) + 1 for x in cur) >= min_chars:
            out.append(" ".join(cur))
            cur = []
    return out


@dataclass
class GenreData:
    """Passages and labels (indices into KINDS) of the train and test plays."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    train_plays: list[str]
    test_plays: list[str]


def genre_data(per_play: int | None = None, test_plays: tuple[str, ...] = GENRE_TEST_PLAYS) -> GenreData:
    """The genre task's split by play; `per_play` keeps only that many passages per play (evenly spaced)."""
    from lmforge.data.corpus import PLAY_KINDS

    unknown = [p for p in test_plays if p not in PLAY_KINDS]
    if unknown:
        raise ConfigError(f"test plays {unknown} have no kind; choose from {sorted(PLAY_KINDS)}")
    split: dict[str, tuple[list[str], list[int], list[str]]] = {"train": ([], [], []), "test": ([], [], [])}
    for play, kind in sorted(PLAY_KINDS.items()):
        ps = play_passages(play)
        if per_play is not None and len(ps) > per_play:
            ps = [ps[i * len(ps) // per_play] for i in range(per_play)]
        texts, labels, plays = split["test" if play in test_plays else "train"]
        texts += ps
        labels += [KINDS.index(kind)] * len(ps)
        plays.append(play)
    return GenreData(*split["train"][:2], *split["test"][:2], split["train"][2], split["test"][2])


def scores(pred: list[int], gold: list[int], n_classes: int = 3) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean of per-class F1; a class never predicted nor present is 0)."""
    acc = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / n_classes}


@torch.no_grad()
def predict(model: nn.Module, head: nn.Module, tokenizer, texts: list[str], batch_size: int = 32,
            max_length: int = 256) -> list[int]:
    """Class indices for `texts` from `head` on `model`."""
    from lmforge.tokenizers.wordpiece import encode_for_encoder

    was = model.training, head.training
    model.eval()
    head.eval()
    out: list[int] = []
    for i in range(0, len(texts), batch_size):
        b = encode_for_encoder(tokenizer, texts[i:i + batch_size], max_length=max_length, truncation=True)
        batch = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "token_type_ids": b.token_type_ids}
        out += class_logits(model, head, batch).argmax(-1).tolist()
    model.train(was[0])
    head.train(was[1])
    return out


def genre_data_kind(recipe, tok, run_dir, seq_len: int):
    """`data.kind: genre` for the run builder (`lmforge finetune`): the genre task's train plays as training
    batches, the held-out plays as validation and test; `data.max_sequences` caps the passages per play."""
    from lmforge.train.run import RunData

    d = genre_data(recipe.data.max_sequences)
    t = recipe.train
    source = LabelledBatches(tok, d.train_texts, d.train_labels, t.batch_size, seq_len, seed=t.seed,
                             val=(d.test_texts, d.test_labels))
    return RunData(source, source.eval_batches, None, {"train_passages": len(d.train_texts),
                                                       "test_passages": len(d.test_texts),
                                                       "train_plays": len(d.train_plays),
                                                       "test_plays": len(d.test_plays)})


def genre_task(model: str = "minilm", steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
               per_play: int | None = None, freeze_encoder: bool = True, max_length: int = 128,
               seed: int = 0, run_dir: str | None = None) -> dict[str, float]:
    """Train a classification head (ell_pred) on an encoder with the one Trainer and score it on held-out plays.

    Returns test accuracy and macro-F1, the majority-class baseline's (the train split's most common kind),
    and the numbers of passages and plays.
    """
    from lmforge.llm import load
    from lmforge.train.optim import OptimConfig
    from lmforge.train.trainer import TrainConfig, Trainer

    llm = load(model)
    if llm.config.attention.causal or llm.tokenizer is None:
        raise ConfigError(f"{model!r}: the genre task needs an encoder with its tokenizer (e.g. minilm)")
    data = genre_data(per_play)
    torch.manual_seed(seed)
    objective = SequenceClassification(n_classes=len(KINDS), freeze_encoder=freeze_encoder).attach(llm.model)
    source = LabelledBatches(llm.tokenizer, data.train_texts, data.train_labels, batch_size, max_length, seed=seed)
    tc = TrainConfig(max_steps=steps, batch_size=batch_size, progress=False, peak_flops=1e11, eval_every=0,
                     checkpoint_every=0, seed=seed)
    trainer = Trainer(llm.model, objective, source, tc, OptimConfig(lr=lr, warmup_steps=max(1, steps // 10),
                                                                   min_lr=lr / 10, weight_decay=0.0),
                      run_dir=run_dir, tokenizer=llm.tokenizer)
    trainer.fit()
    pred = predict(trainer.model, objective.head, llm.tokenizer, data.test_texts, max_length=max_length)
    majority = max(range(len(KINDS)), key=data.train_labels.count)
    out = {f"test_{k}": v for k, v in scores(pred, data.test_labels).items()}
    out.update({f"majority_{k}": v for k, v in scores([majority] * len(data.test_labels), data.test_labels).items()})
    out.update(train_passages=len(data.train_texts), test_passages=len(data.test_texts),
               train_plays=len(data.train_plays), test_plays=len(data.test_plays),
               epochs=math.floor(steps * batch_size / len(data.train_texts) * 100) / 100)
    return out
