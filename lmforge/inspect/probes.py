"""Linear probes: what each layer's representation encodes about a labelled property.

For every layer (0 = the embeddings, i = the residual stream after block i) the passages of a probing set
(`lmforge.inspect.probing_data`) are pooled to one vector each (or kept per token), standardised with the
training split's statistics, and a multinomial logistic regression with an L2 penalty is fitted on the
training plays and scored on the held-out plays.

A probe that fits well may only show that the probe is expressive, not that the representation encodes
the property. Hewitt & Liang, "Designing and Interpreting Probes with Control Tasks" (2019), therefore fit
the same probe to a control task, random labels with the same class balance, and report selectivity:
accuracy minus control accuracy. Here the control labels are drawn per example (pooled features) or per
token type (per-token features, their construction), fixed by the seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from lmforge.errors import NO_TOKENIZER, ConfigError
from lmforge.inspect.probing_data import build_probing_set
from lmforge.models import DecoderLM, EncoderDecoderLM
from lmforge.models.capture import trace

POOLINGS = ("mean", "last", "token")
TOKENS_PER_TEXT = 8  # per-token probing keeps this many seeded positions of each passage


@dataclass
class ProbeResult:
    """Held-out accuracy of a linear probe at each layer, with the control task and the majority baseline."""
    task: str
    layers: list[int]  # 0 = embeddings, i = after block i
    accuracy: list[float]  # held-out accuracy per layer, in [0, 1]
    control_accuracy: list[float]  # the same probe fitted to the control labels
    selectivity: list[float]  # accuracy - control_accuracy
    majority: float  # majority-class accuracy on the held-out split
    n_train: int
    n_test: int
    classes: list[str] = field(default_factory=list)
    pooling: str = "mean"

    def to_dict(self) -> dict:
        """JSON-ready fields (lists, floats, str)."""
        return asdict(self)


def train_probe(features: torch.Tensor, labels: torch.Tensor, *, C: float = 1.0,
                max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit an L2-penalised logistic regression by full-batch L-BFGS in float64; return (weights, bias).

    The objective is scikit-learn's: `C * sum_i loss_i + 0.5 * ||W||^2`, the intercept not penalised. With
    two classes it is the binary (sigmoid) model, weights (1, D), a positive score meaning class 1; with K > 2
    the multinomial (softmax) one, weights (K, D). That is what `LogisticRegression(C=C, solver="lbfgs")`
    fits, so both reach the same optimum.

    Args:
        features: (N, D) training features (already standardised by the caller if wanted).
        labels: (N,) class ids 0..K-1, every class present.
        C: inverse regularisation strength (larger: weaker penalty).
        max_iter: L-BFGS iterations at most.
    """
    if C <= 0:
        raise ConfigError(f"C must be > 0, got {C}")
    X = torch.as_tensor(features).detach().to(torch.float64)
    y = torch.as_tensor(labels).detach().long().to(X.device)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] == 0:
        raise ConfigError(f"train_probe needs features (N, D) and labels (N,) with N > 0, got "
                          f"{tuple(X.shape)} and {tuple(y.shape)}")
    k = int(y.max()) + 1
    if k < 2 or int(y.min()) < 0 or y.unique().numel() != k:
        raise ConfigError(f"labels must be 0..K-1 with K >= 2 and every class present, got {y.unique().tolist()}")
    n, rows = X.shape[0], 1 if k == 2 else k
    W = torch.zeros(rows, X.shape[1], dtype=torch.float64, device=X.device, requires_grad=True)
    b = torch.zeros(rows, dtype=torch.float64, device=X.device, requires_grad=True)

    def objective() -> torch.Tensor:
        z = X @ W.T + b
        if k == 2:
            data = F.binary_cross_entropy_with_logits(z[:, 0], y.to(z.dtype), reduction="sum")
        else:
            data = F.cross_entropy(z, y, reduction="sum")
        # divided by C * n, as scikit-learn scales it: the same optimum, gradients of order one
        return (data + 0.5 / C * W.pow(2).sum()) / n

    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=4 * max_iter, history_size=20,
                            tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def predict_probe(weights: torch.Tensor, bias: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Class ids (N,) that a probe from `train_probe` assigns to `features` (N, D)."""
    z = torch.as_tensor(features).to(weights) @ weights.T + bias
    return (z[:, 0] > 0).long() if weights.shape[0] == 1 else z.argmax(1)


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits scaled by the training split's mean and (population) standard deviation.

    A feature counts as constant, and is only centred, when its variance is within the rounding error of
    computing it (relative to its mean), the rule of scikit-learn's StandardScaler: scale-free, so a
    feature that is tiny everywhere (a LayerNorm dimension with a near-zero gain) is still scaled up.
    """
    train, test = train.double(), test.double()
    n, eps = train.shape[0], torch.finfo(torch.float64).eps
    mu, var = train.mean(0), train.var(0, correction=0)
    constant = var <= n * eps * var + (n * mu.abs() * eps) ** 2
    sd = torch.where(constant, torch.ones_like(var), var.sqrt())
    return (train - mu) / sd, (test - mu) / sd


def _stack(model) -> DecoderLM:
    """The stack of blocks whose residual stream a probe reads: the model, or an encoder-decoder's encoder."""
    stack = model.encoder if isinstance(model, EncoderDecoderLM) else model
    if not isinstance(stack, DecoderLM):
        raise ConfigError(f"probes read the residual stream of a transformer-style model; "
                          f"{type(model).__name__} has no blocks")
    return stack


def _layer_features(model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream (B, T, C) at every layer: the embedding output, then the output of each block (before
    any final norm), as `trace` captures it; an encoder-decoder's encoder stack."""
    t = trace(model, ids, attention_mask=mask, capture=("residual",))
    return t.encoder_residual if t.encoder_residual else t.residual


def _encode(model, tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as the model reads it (special tokens included), cut to its context."""
    cfg = _stack(model).config
    limit = cfg.block_size - cfg.embedding.position_offset
    if hasattr(tokenizer, "normalize"):  # e.g. teenyGPT's character vocabulary: a-z and space only
        texts = [tokenizer.normalize(t) for t in texts]
    return [ids[:limit] for ids in tokenizer.encode_batch(texts, add_special_tokens=True)]


def _pad(rows: list[list[int]], left: bool, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r, dtype=torch.long), True
    return ids.to(device), mask.to(device)


def _pool(h: torch.Tensor, mask: torch.Tensor, pooling: str, picks: list[torch.Tensor]) -> torch.Tensor:
    """(B, T, C) -> (B, C) for "mean" over real tokens or the "last" real token; (sum of picks, C) for "token"."""
    h = h.float()
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)
    if pooling == "last":
        last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    return torch.cat([h[i, p] for i, p in enumerate(picks)])


def _token_picks(mask: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    """Per row, up to TOKENS_PER_TEXT of its real positions, drawn with `gen`, in order."""
    out = []
    for row in mask:
        real = row.nonzero().squeeze(1).cpu()
        out.append(real[torch.randperm(real.numel(), generator=gen)[:TOKENS_PER_TEXT]].sort().values.to(mask.device))
    return out


def layer_features(model, tokenizer, texts: list[str], *, pooling: str = "mean", layers: list[int] | None = None,
                   batch_size: int = 16, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Features of `texts` at each of `layers` (default all, 0 = embeddings): float32 on the CPU.

    Returns (features, rows, token_ids): features[j] is (N, C) for "mean"/"last", or (R, C) for "token" with
    TOKENS_PER_TEXT seeded real positions per text; rows (R,) is the text each row comes from and token_ids
    (R,) its token (-1 for pooled rows).
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if not texts:
        raise ConfigError("no texts to probe: the probing set is empty")
    n_layer = _stack(model).config.n_layer
    layers = list(range(n_layer + 1)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i <= n_layer]
    if bad or not layers:
        raise ConfigError(f"layers {bad or layers} out of range: this model has layers 0..{n_layer} (0 = embeddings)")
    encoded = _encode(model, tokenizer, texts)
    causal = _stack(model).config.attention.causal
    pad_id = next((i for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None))
                   if i is not None), 0)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # batches of similar lengths
    feats: list[list[torch.Tensor]] = [[] for _ in layers]
    rows, toks = [], []
    training = model.training
    model.eval()  # dropout off: the features of a text are fixed
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                ids, mask = _pad([encoded[i] for i in idx], causal, pad_id, device)
                picks = _token_picks(mask, gen) if pooling == "token" else []
                hs = _layer_features(model, ids, mask)
                for j, layer in enumerate(layers):
                    feats[j].append(_pool(hs[layer], mask, pooling, picks).cpu())
                for r, i in enumerate(idx):
                    rows += [i] * (picks[r].numel() if picks else 1)
                    toks += ids[r, picks[r]].tolist() if picks else [-1]
    finally:
        model.train(training)
    rows_t = torch.tensor(rows, dtype=torch.long)
    back = rows_t.argsort(stable=True) if pooling != "token" else torch.arange(len(rows))
    return [torch.cat(f)[back] for f in feats], rows_t[back], torch.tensor(toks, dtype=torch.long)[back]


def _control_labels(labels: torch.Tensor, train: torch.Tensor, token_ids: torch.Tensor, k: int,
                    seed: int) -> torch.Tensor:
    """Random labels with the task's class balance, fixed by `seed` (Hewitt & Liang 2019).

    Pooled rows: the true labels shuffled within each split, so each split keeps its class counts exactly.
    Per-token rows: one label per token type, drawn from the training rows' class frequencies.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    if bool((token_ids >= 0).all()):
        freq = torch.bincount(labels[train], minlength=k).double()
        types = token_ids.unique()
        table = dict(zip(types.tolist(), torch.multinomial(freq, types.numel(), True, generator=gen).tolist()))
        return torch.tensor([table[t] for t in token_ids.tolist()], dtype=torch.long)
    out = labels.clone()
    for part in (train, ~train):
        where = part.nonzero().squeeze(1)
        out[where] = labels[where][torch.randperm(where.numel(), generator=gen)]
    return out


def _accuracy(train_x, train_y, test_x, test_y, C: float, max_iter: int) -> float:
    Xtr, Xte = _standardise(train_x, test_x)
    w, b = train_probe(Xtr, train_y, C=C, max_iter=max_iter)
    return (predict_probe(w, b, Xte) == test_y).double().mean().item()


def probe_layers(llm, task: str = "comedy_vs_tragedy", *, pooling: str = "mean", C: float = 1.0, seed: int = 0,
                 limit: int | None = None, layers: list[int] | None = None, batch_size: int = 16,
                 max_iter: int = 200) -> ProbeResult:
    """Fit a linear probe for `task` at every layer of `llm` and score it on held-out plays.

    Args:
        llm: an `LLM` with a tokenizer (decoder, encoder such as MiniLM, or encoder-decoder: its encoder).
        task: a name in `PROBING_TASKS` (comedy_vs_tragedy, verse_vs_prose, genre).
        pooling: "mean" over real tokens, the "last" real token, or "token" (each token a row).
        C: inverse L2 regularisation strength, as in scikit-learn.
        seed: fixes the probing set, the control labels and the per-token positions.
        limit: the number of passages (default: the probing set's default size).
        layers: the layers to probe (default all: 0 = embeddings .. n_layer).
        batch_size: passages per forward pass.
        max_iter: L-BFGS iterations per probe at most.

    With pooling="token", n_train / n_test and the accuracies count token rows, not passages.
    """
    model, tokenizer = getattr(llm, "model", llm), getattr(llm, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(NO_TOKENIZER)
    if C <= 0:
        raise ConfigError(f"C must be > 0, got {C}")
    _stack(model)
    data = build_probing_set(task, seed=seed, limit=limit)
    feats, rows, toks = layer_features(model, tokenizer, data.texts, pooling=pooling, layers=layers,
                                       batch_size=batch_size, seed=seed)
    labels = torch.tensor(data.labels, dtype=torch.long)[rows]
    train = torch.tensor([data.splits[i] == "train" for i in rows.tolist()])
    control = _control_labels(labels, train, toks, len(data.classes), seed)
    acc, ctl = [], []
    for f in feats:
        acc.append(_accuracy(f[train], labels[train], f[~train], labels[~train], C, max_iter))
        ctl.append(_accuracy(f[train], control[train], f[~train], control[~train], C, max_iter))
    majority = torch.bincount(labels[~train]).max().item() / int((~train).sum())
    used = list(range(len(feats))) if layers is None else list(layers)
    return ProbeResult(task, used, acc, ctl, [a - c for a, c in zip(acc, ctl)], majority,
                       int(train.sum()), int((~train).sum()), list(data.classes), pooling)
