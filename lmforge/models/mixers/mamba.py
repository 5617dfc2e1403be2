"""Mamba's selective state-space mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Algorithm 2), in the layout of `transformers`' MambaMixer.

    x, z   = in_proj(u)                         (B, T, D) each, D = expand * d_model
    x      = silu(causal depthwise conv_k(x))
    dt, B, C = x_proj(x) split (R, N, N);  dt = softplus(dt_proj(dt))     (B, T, D)
    h_t    = exp(dt_t A) * h_{t-1} + dt_t B_t x_t     h: (B, D, N), A = -exp(A_log) (D, N)
    y_t    = C_t . h_t + D * x_t;   out = out_proj(y * silu(z))

Training runs the scan chunk by chunk: within a chunk of L steps, with a_t = cumsum(dt A) (log decays),
h_t = exp(a_t) * (h_0 + sum_{s<=t} exp(-a_s) dt_s B_s x_s), one cumsum instead of L sequential steps
(a loop over T / L chunks, not over tokens). Decode is the O(1) recurrence: the state is the last
k-1 conv inputs and h, the same size at position 10 and 10,000.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.models.mixers.base import MixerContext, RecurrentState

_CHUNK = 16  # steps per chunk: exp(-a_s) stays within fp32 range while T / L Python steps stay few


class MambaState(RecurrentState):
    """One layer's decode state: the last d_conv-1 conv inputs (B, k-1, D) and the SSM state h (B, D, N).

    The conv inputs are kept time-major so that appending a token's D channels is one contiguous copy."""

    def __init__(self, batch_size: int, d_inner: int, d_conv: int, d_state: int, dtype, device):
        self.conv = torch.zeros(batch_size, d_conv - 1, d_inner, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch_size, d_inner, d_state, dtype=torch.float32, device=device)



def selective_scan(x, dt, A, B, C, h0=None, chunk: int = _CHUNK):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, chunked. Returns y (B, T, D) and h_T.

    x, dt: (B, T, D); A: (D, N); B, C: (B, T, N); h0: (B, D, N) or None. All in fp32.
    """
    Bsz, T, D = x.shape
    h = h0 if h0 is not None else x.new_zeros(Bsz, D, A.shape[1])
    ys = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        dA = dt[:, s:e, :, None] * A  # (B, L, D, N) log decay per step, <= 0
        a = dA.cumsum(1)
        u = (dt[:, s:e] * x[:, s:e])[..., None] * B[:, s:e, None, :]  # (B, L, D, N)
        hs = a.exp() * (h[:, None] + ((-a).exp() * u).cumsum(1))  # (B, L, D, N) every state of the chunk
        ys.append(torch.einsum("bldn,bln->bld", hs, C[:, s:e]))
        h = hs[:, -1]
    return torch.cat(ys, 1), h


class Mamba(nn.Module):
    """Selective SSM token mixer. Parameter names follow `transformers`' MambaMixer."""

    attr = "mixer"
    resid_projs = ("out_proj",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """Problems with the `ssm` settings Mamba reads (state size, conv width, expansion, dt rank)."""
        s = cfg.ssm
        out = [f"ssm.{f} must be a positive integer" for f in ("d_state", "d_conv", "expand")
               if not (isinstance(getattr(s, f), int) and getattr(s, f) > 0)]
        if out:
            return out
        if s.d_conv < 2:
            out.append("ssm.d_conv must be >= 2")
        if not (s.dt_rank is None or s.dt_rank > 0):
            out.append("ssm.dt_rank must be positive")
        return out

    def __init__(self, cfg: Config):
        super().__init__()
        s = cfg.ssm
        C, D, N = cfg.d_model, s.expand * cfg.d_model, s.d_state
        self.d_inner, self.d_state, self.d_conv = D, N, s.d_conv
        self.dt_rank = s.dt_rank or math.ceil(C / 16)
        self.in_proj = nn.Linear(C, 2 * D, bias=s.proj_bias)
        self.conv1d = nn.Conv1d(D, D, s.d_conv, groups=D, padding=s.d_conv - 1, bias=s.conv_bias)
        self.x_proj = nn.Linear(D, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, D, bias=True)
        self.A_log = nn.Parameter(torch.empty(D, N))
        self.D = nn.Parameter(torch.empty(D))
        self.out_proj = nn.Linear(D, C, bias=s.proj_bias)
        self.init_extra()

    @torch.no_grad()
    def init_extra(self) -> None:
        """Mamba's own initialisation (after the model's generic one): S4D-real A = -(1..N), D = 1, and
        dt_proj's bias so that softplus(bias) is log-uniform in [1e-3, 0.1] (Gu & Dao 2023, sec. 3.6)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> MambaState:
        return MambaState(batch_size, self.d_inner, self.d_conv, self.d_state, dtype, device)

    def forward(self, u: torch.Tensor, ctx: MixerContext, state: MambaState | None) -> torch.Tensor:
        Bsz, T, _ = u.shape
        if state is not None and T == 1 and ctx.pad is None:
            return self._step(u, state)
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, D) each
        pad = ctx.pad[..., None] if ctx.pad is not None else None
        if pad is not None:  # padding contributes nothing: the state is what the real tokens build
            x = x * pad
        xt = x.transpose(1, 2)  # (B, D, T)
        prev = state.conv.transpose(1, 2) if state is not None else xt.new_zeros(Bsz, self.d_inner, self.d_conv - 1)
        xt = torch.cat([prev.to(xt.dtype), xt], dim=2)  # (B, D, k-1+T)
        if state is not None:
            state.conv.copy_(xt[:, :, -(self.d_conv - 1):].transpose(1, 2))
        x = F.silu(F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2)
        if pad is not None:
            x = x * pad
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())  # (B, T, D)
        A = -torch.exp(self.A_log.float())  # (D, N)
        xf = x.float()
        y, h = selective_scan(xf, dt, A, B.float(), C.float(), state.ssm if state is not None else None)
        if state is not None:
            state.ssm.copy_(h)
        y = y + xf * self.D.float()
        y = y.to(u.dtype) * F.silu(z)
        return self.out_proj(y)

    def _decode_consts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A = -exp(A_log) (D, N) in fp32 and the conv weight time-major (k, D). Without autograd they are
        kept between decode steps until a weight changes (fewer ops per layer and token)."""
        A_log, w = self.A_log, self.conv1d.weight
        if torch.is_grad_enabled() or A_log.is_inference():  # inference tensors keep no version to check
            return -torch.exp(A_log.float()), w[:, 0].t()
        key = (A_log._version, A_log.data_ptr(), w._version, w.data_ptr(), w.dtype)
        if getattr(self, "_consts_key", None) != key:
            self._consts = (-torch.exp(A_log.float()), w[:, 0].t().contiguous())
            self._consts_key = key
        return self._consts

    def _step(self, u: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One decode token in as few kernels as the maths allows (at batch 1 a step is launch overhead and
        weight reads, not arithmetic): the conv is a weighted sum over the window of the last k inputs (a
        conv1d call costs ~0.4 ms on the CPU for this one column), and the SSM state is updated in place
        (h *= exp(dt A); h += dt x B), y = C . h + D x in two more ops."""
        # every tensor stays (B, 1, .): no squeeze/unsqueeze round trips
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, 1, D) each
        f32 = x.dtype == torch.float32
        A, w = self._decode_consts()
        window = torch.cat([state.conv, x if x.dtype == state.conv.dtype else x.to(state.conv.dtype)], dim=1)
        state.conv = window[:, 1:]  # (B, k-1, D) the last k-1 inputs: a view of the window, no copy
        x = (window * w).sum(1, keepdim=True)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x if x.dtype == u.dtype else x.to(u.dtype))  # (B, 1, D)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt) if f32 else self.dt_proj(dt).float())  # (B, 1, D)
        xf = x if f32 else x.float()
        if not f32:
            B, C = B.float(), C.float()
        h = state.ssm  # (B, D, N), fp32
        h.mul_(torch.exp(dt.mT * A))
        h.addcmul_((dt * xf).mT, B)  # (B, D, 1) * (B, 1, N)
        y = torch.addcmul(torch.bmm(C, h.mT), xf, self.D if f32 else self.D.float())  # (B, 1, D)
        return self.out_proj((y if f32 else y.to(u.dtype)) * F.silu(z))
