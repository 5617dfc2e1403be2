"""The inspection analyses computed by hand in plain PyTorch on a real (tiny) model, in the shapes of
`lmforge.inspect`'s results (the contract's field names), to test the pictures, the command line and the
server independently of how `lmforge.inspect` computes them.

Each builder checks itself against the model where it can (attention maps rebuild the attention output,
the last logit-lens layer equals the logits), so that the numbers the pictures show are the model's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.inspect.render import plain


def _tensor_ids(llm_or_model, text_or_ids) -> torch.Tensor:
    if isinstance(text_or_ids, torch.Tensor):
        return text_or_ids.reshape(1, -1).long()
    return torch.tensor([llm_or_model.tokenizer.encode(text_or_ids, add_special_tokens=False)])


def token_strings(llm, ids: torch.Tensor) -> list[str]:
    return [llm.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids.reshape(-1)]


def attention_by_hand(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q k^T * scale + causal mask) per layer, (1, n_head, T, T), for a model without RoPE (GPT-2):
    rebuilt from each attention module's input, and checked to give that module's output."""
    maps, checks = [], []

    def hook(mod, args, out):
        x = args[0]
        B, T, _ = x.shape
        nh, hs = mod.n_head, mod.head_dim
        q, k, v = mod.qkv(x).split(nh * hs, dim=-1)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        scale = mod.scale if mod.scale is not None else hs ** -0.5
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        att = scores.softmax(-1)
        y = mod.proj((att @ v).transpose(1, 2).reshape(B, T, nh * hs))
        maps.append(att.detach())
        checks.append((y.detach(), out.detach()))

    handles = [b.token_mixer.register_forward_hook(hook) for b in model.blocks]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    for mine, theirs in checks:
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max(), "attention rebuilt by hand differs"
    return maps


def rollout_by_hand(maps: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema (2020): the product over layers of 0.5 * (mean-of-heads attention + I), rows renormalised."""
    T = maps[0].shape[-1]
    out = torch.eye(T)
    for a in maps:
        a = 0.5 * (a[0].mean(0) + torch.eye(T))
        out = (a / a.sum(-1, keepdim=True)) @ out
    return out


def residuals(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residual stream: the embedding output then each block's output (1, T, C), and the logits."""
    stream: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: stream.append(a[0].detach()))]
    hooks += [b.register_forward_hook(lambda m, a, o: stream.append(o.detach())) for b in model.blocks]
    try:
        with torch.no_grad():
            logits = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return stream, logits


def lens_by_hand(llm, text: str, k: int = 3, target: int | None = None) -> dict:
    """The logit lens lm_head(norm_f(h_l)) of every residual, top-k and the target's rank, as `LogitLens` fields."""
    model = llm.model
    ids = _tensor_ids(llm, text)
    stream, logits = residuals(model, ids)
    with torch.no_grad():
        probs = torch.stack([model.head_logits(model.norm_f(h))[0].float().softmax(-1) for h in stream])
    assert (probs[-1] - logits[0].float().softmax(-1)).abs().max() < 1e-5  # the last layer is the model's output
    top = probs.topk(k, dim=-1)
    rank = None
    if target is not None:
        rank = (probs > probs[..., target : target + 1]).sum(-1)
    tok = lambda i: llm.tokenizer.decode([int(i)], skip_special_tokens=False)  # noqa: E731
    return {"tokens": token_strings(llm, ids), "top_ids": top.indices,
            "top_tokens": [[[tok(i) for i in pos] for pos in layer] for layer in top.indices.tolist()],
            "top_probs": top.values, "target_id": target, "target_rank": rank}


@dataclass
class ByHandAttribution:
    """An `Attribution`'s fields, computed by hand (see `attribute_by_hand`)."""

    tokens: list[str]
    input_ids: torch.Tensor
    scores: torch.Tensor
    per_dim: torch.Tensor
    target_id: int
    target: str
    method: str
    delta: float | None
    steps: int | None
    baseline: str | None

    def to_dict(self) -> dict:
        return plain(asdict(self))


def _target_logit(model, ids, emb_value: torch.Tensor, target: int) -> torch.Tensor:
    """The target's next-token logit at the last position with the token embeddings replaced by `emb_value`."""
    handle = model.tok_emb.register_forward_hook(lambda m, a, o: emb_value)
    try:
        return model(ids)[:, -1, target].sum()
    finally:
        handle.remove()


def attribute_by_hand(llm, text_or_ids, *, target=None, method: str = "gradient_x_input", steps: int = 16,
                      **_) -> ByHandAttribution:
    """Gradient x input, saliency (|grad| summed) or integrated gradients (zeros baseline, trapezoid rule) of
    the target's logit with respect to the token embeddings: the definitions, one backward per point."""
    model = llm.model
    ids = _tensor_ids(llm, text_or_ids)
    with torch.no_grad():
        emb = model.tok_emb(ids)
        logits = model(ids)[0, -1]
    if target is None:
        target = int(logits.argmax())
    elif isinstance(target, str):
        target = llm.tokenizer.encode(target, add_special_tokens=False)[0]

    def grad_at(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_target_logit(model, ids, x, target), x)
        return g[0]

    delta = None
    if method == "integrated_gradients":
        alphas = torch.linspace(0, 1, steps)
        weights = torch.full((steps,), 1.0 / (steps - 1))
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        per_dim = sum(w * grad_at(a * emb) for a, w in zip(alphas, weights)) * emb[0]
        with torch.no_grad():
            gap = logits[target] - _target_logit(model, ids, torch.zeros_like(emb), target)
        delta = float(per_dim.sum() - gap)
    elif method == "saliency":
        per_dim = grad_at(emb).abs()
    else:
        per_dim = grad_at(emb) * emb[0]
    scores = per_dim.sum(-1)
    return ByHandAttribution(token_strings(llm, ids), ids[0], scores.detach(), per_dim.detach(), target,
                             llm.tokenizer.decode([target], skip_special_tokens=False), method, delta,
                             steps if method == "integrated_gradients" else None,
                             "zeros" if method == "integrated_gradients" else None)


def head_ablation_by_hand(model: nn.Module, ids: torch.Tensor) -> dict:
    """The next-token loss change when each head's output slice is zeroed before the output projection."""

    def loss() -> float:
        with torch.no_grad():
            logits = model(ids)
        return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))

    base = loss()
    n_layer, n_head = len(model.blocks), model.blocks[0].token_mixer.n_head
    hs = model.blocks[0].token_mixer.head_dim
    scores = torch.zeros(n_layer, n_head)
    for layer in range(n_layer):
        for head in range(n_head):
            def zero(m, a, head=head):
                y = a[0].clone()
                y[..., head * hs:(head + 1) * hs] = 0
                return (y,)

            handle = model.blocks[layer].token_mixer.proj.register_forward_pre_hook(zero)
            try:
                scores[layer, head] = loss() - base
            finally:
                handle.remove()
    order = scores.flatten().abs().argsort(descending=True)[:10]
    top = [(int(i) // n_head, int(i) % n_head, float(scores.flatten()[i])) for i in order]
    return {"scores": scores, "baseline": base, "metric": "loss", "top": top}


def probes_by_hand(model: nn.Module, vocab: int, seed: int = 0) -> dict:
    """Logistic-regression probes (scikit-learn) per layer for "does the text hold token 7", on mean-pooled
    residuals of 80 random 12-token texts, with a control task of random labels."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (80, 12), generator=g)
    labels = torch.arange(80) % 2
    ids[labels == 1, 5] = 7
    control = torch.randint(0, 2, (80,), generator=g)
    stream, _ = residuals(model, ids)
    acc, ctl = [], []
    for h in stream:
        feats = h.mean(1).numpy()
        for y, out in ((labels, acc), (control, ctl)):
            clf = LogisticRegression(C=1.0, max_iter=500).fit(feats[:60], y[:60].numpy())
            out.append(float(clf.score(feats[60:], y[60:].numpy())))
    return {"task": "holds_token_7", "layers": list(range(len(stream))), "accuracy": acc, "control_accuracy": ctl,
            "selectivity": [a - c for a, c in zip(acc, ctl)], "majority": 0.5, "n_train": 60, "n_test": 20}
