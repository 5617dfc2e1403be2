"""RWKV-4 time-mix and channel-mix (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era",
eq. 11-20), parameter names as `transformers`' RWKV (`time_decay`, `time_first`, `time_mix_k`, ...).

Time mix, per channel, with token shift x'_t = mu * x_t + (1 - mu) * x_{t-1}:
    r = sigmoid(W_r x'), k = W_k x', v = W_v x',  w = exp(time_decay) > 0, u = time_first
    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same without v)
    out   = W_o (r * wkv)
Channel mix: r = sigmoid(W_r x'), out = r * W_v relu(W_k x')^2.

Both forms are one function, `wkv`: a chunk of L tokens is computed in parallel (an L x L x C weight,
exponents shifted by their maximum so nothing overflows), chunks are chained through the state
(a, b, p) = numerator, denominator and their common log-scale. Chunk = T is the parallel form, chunk = 1
the RNN; training uses 32. The decode state (shifts and a, b, p) is (B, C) per tensor at any position.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import Config
from lmforge.models.mixers.base import MixerContext, RecurrentState

_CHUNK = 32
_NEG = -1e30  # log of an empty sum (finite, so that differences stay defined)


class RWKVState(RecurrentState):
    """Token-shift inputs of both mixers (B, C) and the wkv numerator/denominator/log-scale (B, C), fp32."""

    def __init__(self, batch_size: int, d_model: int, device):
        z = lambda: torch.zeros(batch_size, d_model, device=device)  # noqa: E731
        self.tshift, self.cshift, self.a, self.b = z(), z(), z(), z()
        self.p = torch.full((batch_size, d_model), _NEG, device=device)



def wkv(k, v, w, u, state=None, chunk: int = _CHUNK):
    """wkv_t for k, v (B, T, C) fp32, decay w > 0 and bonus u (C,). Returns (wkv, (a, b, p))."""
    B, T, C = k.shape
    if state is None:
        a, b, p = k.new_zeros(B, C), k.new_zeros(B, C), k.new_full((B, C), _NEG)
    else:
        a, b, p = state
    outs = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        L = e - s
        kc, vc = k[:, s:e], v[:, s:e]
        j = torch.arange(L, device=k.device, dtype=k.dtype)
        gap = (j[:, None] - 1 - j[None, :])  # (L, L): t - 1 - i
        E = torch.where((gap >= 0)[..., None], -gap[..., None] * w + kc[:, None], torch.full((), _NEG))  # (B,L,L,C)
        Es = p[:, None] - j[None, :, None] * w  # (B, L, C) the carried state, decayed j more steps
        Eu = u + kc  # (B, L, C) the current token, with the bonus
        m = torch.maximum(torch.maximum(E.amax(2), Es), Eu)
        wE, ws, wu = (E - m[:, :, None]).exp(), (Es - m).exp(), (Eu - m).exp()
        num = (wE * vc[:, None]).sum(2) + ws * a[:, None] + wu * vc
        den = wE.sum(2) + ws * b[:, None] + wu
        outs.append(num / den)
        # state for the token after the chunk: sum_i e^{-(L-1-i) w + k_i} (.) plus the old state decayed L steps
        Ek = -(L - 1 - j)[None, :, None] * w + kc  # (B, L, C)
        Eo = p - L * w
        p2 = torch.maximum(Ek.amax(1), Eo)
        wk, wo = (Ek - p2[:, None]).exp(), (Eo - p2).exp()
        a, b, p = (wk * vc).sum(1) + wo * a, wk.sum(1) + wo * b, p2
    return torch.cat(outs, 1), (a, b, p)


def _shift(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """x_{t-1} for every t: (B, T, C), the first from `prev` (B, C) or zeros."""
    first = prev[:, None].to(x.dtype) if prev is not None else torch.zeros_like(x[:, :1])
    return torch.cat([first, x[:, :-1]], 1)


def _unpaired_rwkv(cfg: Config) -> list[str]:
    return [f"layer {i}: RWKV's time-mix and channel-mix share one decode state; use 'rwkv+rwkv'"
            for i, (token, channel) in enumerate(cfg.layer_mixers()) if (token == "rwkv") != (channel == "rwkv")]


class RWKVTimeMix(nn.Module):
    """RWKV-4 time mixing (token mixer)."""

    attr = "time_mix"
    resid_projs = ("output",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """Time-mix and channel-mix share one decode state, so every layer has both or neither."""
        return _unpaired_rwkv(cfg)

    def __init__(self, cfg: Config):
        super().__init__()
        C = cfg.d_model
        ratio = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        # the RWKV-4 initialisation at mid depth: decay speeds spread over channels, mixes ramp up
        self.time_decay = nn.Parameter(-5 + 8 * ratio ** 1.35)
        self.time_first = nn.Parameter(torch.full((C,), 0.3).log() + 0.5 * ((torch.arange(C) + 1) % 3 - 1))
        self.time_mix_k = nn.Parameter(ratio ** 0.5)
        self.time_mix_v = nn.Parameter(ratio ** 0.5 + 0.15)
        self.time_mix_r = nn.Parameter(ratio ** 0.25)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> RWKVState:
        return RWKVState(batch_size, self.key.in_features, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: RWKVState | None) -> torch.Tensor:
        if ctx.pad is not None:
            x = x * ctx.pad[..., None]
        xx = _shift(x, state.tshift if state is not None else None)
        if state is not None:
            state.tshift = x[:, -1].float()
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + xx * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k, v, r = self.key(xk).float(), self.value(xv).float(), torch.sigmoid(self.receptance(xr).float())
        if ctx.pad is not None:  # padding adds nothing to the sums
            k = torch.where(ctx.pad[..., None], k, torch.full((), _NEG))
        prev = (state.a, state.b, state.p) if state is not None else None
        y, (a, b, p) = wkv(k, v, self.time_decay.float().exp(), self.time_first.float(), prev)
        if state is not None:
            state.a, state.b, state.p = a, b, p
        return self.output((r * y).to(x.dtype))


class RWKVChannelMix(nn.Module):
    """RWKV-4 channel mixing (channel mixer); its token shift lives in the layer's `RWKVState`."""

    attr = "channel_mix"
    resid_projs = ("value",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """Time-mix and channel-mix share one decode state, so every layer has both or neither."""
        return _unpaired_rwkv(cfg)

    def __init__(self, cfg: Config):
        super().__init__()
        C, h = cfg.d_model, cfg.mlp.hidden
        ratio = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        self.time_mix_k = nn.Parameter(ratio ** 0.5)
        self.time_mix_r = nn.Parameter(ratio ** 0.5)
        self.key = nn.Linear(C, h, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(h, C, bias=False)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: RWKVState | None = None) -> torch.Tensor:
        if ctx.pad is not None:
            x = x * ctx.pad[..., None]
        xx = _shift(x, state.cshift if state is not None else None)
        if state is not None:
            state.cshift = x[:, -1].float()
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)).square())
