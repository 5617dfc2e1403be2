"""S4D, the diagonal structured state space (Gu, Gupta, Goel & Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"), as a token mixer.

Per channel c (H = d_model channels) and mode n (N/2 complex modes, conjugate pairs implied):
    A_n = -exp(log_A_real) + i A_imag   (S4D-Lin init: -1/2 + i pi n),   dt = exp(log_dt)
    zero-order hold:  dA = exp(dt A),  dB = (dA - 1) / A
    recurrent:  h_t = dA h_{t-1} + dB u_t,          y_t = 2 Re(C . h_t) + D u_t
    parallel:   y = K * u + D u,  K_l = 2 Re(sum_n C_n dB_n dA_n^l)   (a causal convolution, by FFT:
                O(T log T), the seed's "S4: O(N log N) training")
then GELU and an output projection (the S4 block's position-wise mixing). The parallel form also carries
a state in: y_t gains 2 Re(C dA^(t+1) h_0), and the state out is dA^T h_0 + sum_s dA^(T-1-s) dB u_s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Config
from lmforge.models.mixers.base import MixerContext, RecurrentState


class S4DState(RecurrentState):
    """h (B, H, N/2) complex."""

    def __init__(self, batch_size: int, channels: int, modes: int, device):
        self.h = torch.zeros(batch_size, channels, modes, dtype=torch.complex64, device=device)


def s4d_scan(u, dA, dB, C, h0=None, parallel: bool = True):
    """y (B, T, H) and final state (B, H, M) for input u (B, T, H) fp32; dA, dB, C (H, M) complex."""
    B, T, H = u.shape
    if not parallel:  # the recurrence, one step per token
        h = h0 if h0 is not None else u.new_zeros(B, H, dA.shape[1], dtype=torch.complex64)
        ys = []
        for t in range(T):
            h = dA * h + dB * u[:, t, :, None]
            ys.append(2 * (h * C).sum(-1).real)
        return torch.stack(ys, 1), h
    powers = dA[..., None] ** torch.arange(T + 1, device=u.device)  # (H, M, T+1): dA^0 .. dA^T
    K = 2 * torch.einsum("hm,hml->hl", C * dB, powers[..., :T]).real  # (H, T)
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(u.transpose(1, 2), n=n) * torch.fft.rfft(K, n=n), n=n)[..., :T]
    y = y.transpose(1, 2)  # (B, T, H)
    rev = powers[..., :T].flip(-1)  # dA^(T-1-s)
    hT = torch.einsum("hml,blh->bhm", dB[..., None] * rev, u.to(torch.complex64))
    if h0 is not None:
        y = y + 2 * torch.einsum("hml,bhm->blh", C[..., None] * powers[..., 1:], h0).real
        hT = hT + powers[..., T] * h0
    return y, hT


class S4D(nn.Module):
    """Diagonal SSM token mixer; `ssm.d_state` = N (N/2 complex modes per channel)."""

    attr = "mixer"
    resid_projs = ("out_proj",)

    @classmethod
    def check(cls, cfg: Config) -> list[str]:
        """The modes come in conjugate pairs: an even, positive ssm.d_state."""
        if not (cfg.ssm.d_state % 2 == 0 and cfg.ssm.d_state > 0):
            return [f"ssm.d_state must be a positive even number for s4d (conjugate pairs), got {cfg.ssm.d_state}"]
        return []

    def __init__(self, cfg: Config):
        super().__init__()
        H, M = cfg.d_model, cfg.ssm.d_state // 2
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.log_A_real = nn.Parameter(torch.full((H, M), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(M, dtype=torch.float32).expand(H, M).clone())
        self.C = nn.Parameter(torch.randn(H, M, 2) * 0.5 ** 0.5)  # complex, as (real, imag)
        self.D = nn.Parameter(torch.randn(H))
        self.out_proj = nn.Linear(H, H)
        self.modes = M

    def _discrete(self):
        A = torch.complex(-self.log_A_real.exp(), self.A_imag)  # (H, M)
        dtA = A * self.log_dt.exp()[:, None]
        dA = dtA.exp()
        dB = (dA - 1) / A
        return dA, dB, torch.view_as_complex(self.C.contiguous())

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> S4DState:
        return S4DState(batch_size, self.out_proj.in_features, self.modes, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: S4DState | None) -> torch.Tensor:
        u = x.float()
        if ctx.pad is not None:
            u = u * ctx.pad[..., None]
        dA, dB, C = self._discrete()
        h0 = state.h if state is not None else None
        y, h = s4d_scan(u, dA, dB, C, h0, parallel=x.shape[1] > 1)
        if state is not None:
            state.h = h
        y = y + u * self.D
        return self.out_proj(F.gelu(y).to(x.dtype))
