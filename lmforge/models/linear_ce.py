"""Cross-entropy through the LM head in row chunks: the (tokens x vocab) logits are never held whole.

For hidden states h (N, C), head W (V, C) (+ bias b) and targets y, token i's loss is
    nll_i = logsumexp(z_i) - z_i[y_i],   z_i = W h_i + b,
and its gradient is d nll_i / d z_i = softmax(z_i) - onehot(y_i). At SmolLM2's vocabulary (49,152) a
2 x 256 batch's fp32 logits are 96 MB, and the plain path keeps three such tensors (logits, their
log-softmax, their gradient). Here each chunk of rows computes its logits, its losses and, while the
logits are at hand, its share of the gradients (as Liger-Kernel's fused linear cross-entropy does), so
backward needs no second pass over the head:

- grad_h_i = (softmax(z_i) - onehot(y_i)) W is kept per row (N x C, small) and scaled by the incoming
  gradient of nll_i in backward: exact for any upstream gradient, since nll_i depends only on h_i.
- grad_W = sum_i g_i (softmax(z_i) - onehot(y_i)) h_i^T needs the upstream g_i. It is accumulated in
  forward for g_i = 1 and scaled in backward when every counted token gets the same g (token-mean and
  per-sequence-sum losses do); otherwise (DPO's per-sequence weights) the chunks are recomputed with g.
  A frozen head (LoRA, QLoRA, a frozen tied embedding) skips it, and evaluation skips every gradient.

Targets equal to `ignore_index` count nothing: nll 0, no gradient, and their rows never reach the head
(a SmolLM2 LoRA step on the shipped instruction set, batch 2 x 256, 2 threads, Xeon: the head's forward
fell from 396 ms of a 1.59 s step to 26 ms of 1.21 s). Under autocast the head runs in the
autocast dtype as `F.linear` would, and the softmax in fp32 (the plain path's `logits.float()`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MB in fp32 (~85 rows at a 49k vocabulary)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def _chunk_loss(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, grad: bool):
    """(nll, hit, dz) of one chunk's fp32 logits z (rows, V), which it overwrites: dz = softmax(z) - onehot(y)
    on counted rows, 0 on ignored ones (None without `grad`). Five passes over z, no (rows, V) temporaries."""
    yi = y.clamp(min=0).unsqueeze(1)
    picked = z.gather(1, yi).squeeze(1)
    m, arg = z.max(1)  # the row maximum and the argmax in one pass
    z.sub_(m.unsqueeze(1)).exp_()
    total = z.sum(1)
    nll = (total.log() + m - picked).masked_fill_(~valid, 0.0)
    hit = (arg == y) & valid
    if not grad:
        return nll, hit, None
    z.mul_((valid / total).unsqueeze(1))  # softmax on counted rows, 0 on ignored ones
    z.scatter_add_(1, yi, -valid.to(z.dtype).unsqueeze(1))
    return nll, hit, z


def _accumulate(gw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, cdt: torch.dtype) -> None:
    """gw (fp32) += dz^T h, the matmul in the compute dtype (bf16 under autocast, as F.linear's backward)."""
    if cdt == torch.float32:
        gw.addmm_(dz.t(), h)
    else:
        gw.add_(dz.to(cdt).t() @ h)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk, grad):
        cdt = _compute_dtype(h)
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        hc = h.to(cdt)
        N = h.shape[0]
        valid = y != IGNORE_INDEX
        need_h = grad and ctx.needs_input_grad[0]
        need_w = grad and (ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]))
        nll = torch.zeros(N, dtype=torch.float32, device=h.device)
        hit = torch.zeros(N, dtype=torch.bool, device=h.device)
        gh = torch.empty(N, h.shape[1], dtype=torch.float32, device=h.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_w and bias is not None \
            else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = F.linear(hc[s:e], w, b).float()  # (rows, V)
            nll[s:e], hit[s:e], dz = _chunk_loss(z, y[s:e], valid[s:e], need_h or need_w)
            if dz is not None:
                if need_h:
                    gh[s:e] = (dz.to(cdt) @ w).float()
                if need_w:
                    _accumulate(gw, dz, hc[s:e], cdt)
                    if gb is not None:
                        gb.add_(dz.sum(0))
        ctx.chunk, ctx.cdt, ctx.h_dtype = chunk, cdt, h.dtype
        if need_w:  # the inputs are needed again only if the weight gradient must be recomputed
            ctx.save_for_backward(h, weight, bias, y, gh, gw, gb)
        else:
            ctx.save_for_backward(None, None, None, y, gh, None, None)
        ctx.mark_non_differentiable(hit)
        return nll, hit

    @staticmethod
    def backward(ctx, g_nll, _g_hit):
        h, weight, bias, y, gh, gw, gb = ctx.saved_tensors
        valid = y != IGNORE_INDEX
        g = g_nll.float() * valid
        grad_h = (gh * g.unsqueeze(1)).to(ctx.h_dtype) if gh is not None else None
        grad_w = grad_b = None
        if gw is not None:
            gv = g[valid]
            if gv.numel() == 0 or bool((gv == gv[0]).all()):  # one weight for every counted token: scale
                s = gv[0] if gv.numel() else g.new_zeros(())
                grad_w = (gw * s).to(weight.dtype)
                grad_b = (gb * s).to(bias.dtype) if gb is not None else None
            else:
                grad_w, grad_b = _recompute_weight_grads(h, weight, bias, y, valid, g, ctx.chunk, ctx.cdt)
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None


def _recompute_weight_grads(h, weight, bias, y, valid, g, chunk, cdt):
    """grad_W (and grad_b) for per-token upstream gradients `g`: a second pass over the chunks, in the
    forward's compute dtype `cdt` (backward runs outside autocast)."""
    w = weight.to(cdt)
    b = bias.to(cdt) if bias is not None else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if bias is not None else None
    for s in range(0, h.shape[0], chunk):
        e = min(s + chunk, h.shape[0])
        z = F.linear(h[s:e].to(cdt), w, b).float()
        dz = _chunk_loss(z, y[s:e], valid[s:e], True)[2].mul_(g[s:e].unsqueeze(1))
        _accumulate(gw, dz, h[s:e].to(cdt), cdt)
        if gb is not None:
            gb.add_(dz.sum(0))
    return gw.to(weight.dtype), gb.to(bias.dtype) if gb is not None else None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of `targets` under logits `hidden @ weight.T + bias`, without holding the logits.

    Args:
        hidden: (..., C) final hidden states.
        weight: (V, C) the LM head's output weight; bias: (V,) or None.
        targets: (...) token ids, `IGNORE_INDEX` (-100) where nothing counts.
        chunk_rows: rows per chunk (default: about 4M logits per chunk).

    Returns:
        (nll, hit): nll (...) fp32, differentiable, 0 where ignored; hit (...) bool, the argmax equals
        the target (False where ignored).
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    if y.numel() != h.shape[0]:
        raise ValueError(f"targets {tuple(shape)} do not match hidden states {tuple(hidden.shape)}")
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    grad = torch.is_grad_enabled()  # Function.forward always runs without grad mode: decided here
    valid = y != IGNORE_INDEX
    n_valid = int(valid.sum())
    if n_valid == y.numel():
        nll, hit = _LinearCrossEntropy.apply(h, weight, bias, y, int(chunk), grad)
        return nll.view(shape), hit.view(shape)
    # only the counted rows go through the head: instruction tuning counts the answers alone (2-6% of a
    # padded SmolLM2 batch of the shipped set), and an ignored row's loss and gradients are zero anyway
    rows = valid.nonzero().squeeze(1)
    nll_v, hit_v = _LinearCrossEntropy.apply(h.index_select(0, rows), weight, bias, y.index_select(0, rows),
                                             int(chunk), grad)
    nll = torch.zeros(y.numel(), dtype=nll_v.dtype, device=y.device).index_copy(0, rows, nll_v)
    hit = torch.zeros(y.numel(), dtype=torch.bool, device=y.device).index_copy_(0, rows, hit_v)
    return nll.view(shape), hit.view(shape)
