"""The LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000) as a token mixer:
the classical recurrent language model (Sundermeyer et al. 2012; Zaremba et al. 2014) inside the one block.

Per step, with gates from the input x_t and the previous output h_{t-1}:
    i, f, g, o = sigmoid(W_i [x, h]), sigmoid(W_f [x, h]), tanh(W_g [x, h]), sigmoid(W_o [x, h])
    c_t = f * c_{t-1} + i * g,      h_t = o * tanh(c_t)
then an output projection back into the residual stream (`proj`), as every mixer writes C channels.

Training runs `torch.nn.LSTM` over the whole sequence (one fused kernel per layer); decoding carries
(h, c), (B, C) each, in the cache, so a step costs the same at any position. With left padding each
row runs over its real tokens only, so its state is exactly what those tokens build (an LSTM fed a zero
vector still moves, unlike the linear recurrences that zero their input at padding).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import Config
from lmforge.models.mixers.base import MixerContext, RecurrentState


class LSTMState(RecurrentState):
    """The LSTM's output h and cell c after the tokens seen so far: (B, C) each, fp32."""

    def __init__(self, batch_size: int, hidden: int, device):
        self.h = torch.zeros(batch_size, hidden, device=device)
        self.c = torch.zeros(batch_size, hidden, device=device)


class LSTM(nn.Module):
    """One LSTM layer over the sequence plus an output projection (token mixer "lstm")."""

    attr = "lstm"
    resid_projs = ("proj",)

    def __init__(self, cfg: Config):
        super().__init__()
        C = cfg.d_model
        self.cell = nn.LSTM(C, C, batch_first=True)  # weight_ih_l0 (4C, C): gates i, f, g, o
        self.proj = nn.Linear(C, C, bias=False)

    def new_state(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> LSTMState:
        return LSTMState(batch_size, self.proj.in_features, device)

    def forward(self, x: torch.Tensor, ctx: MixerContext, state: LSTMState | None) -> torch.Tensor:
        dt = self.cell.weight_ih_l0.dtype
        with torch.autocast(x.device.type, enabled=False):  # the recurrence in the weights' dtype
            y = self._run(x.to(dt), ctx.pad, state)
        return self.proj(y.to(x.dtype))

    def _run(self, x: torch.Tensor, pad: torch.Tensor | None, state: LSTMState | None) -> torch.Tensor:
        B = x.shape[0]
        if state is not None:
            h0, c0 = state.h.to(x.dtype), state.c.to(x.dtype)
        else:
            h0 = c0 = x.new_zeros(B, x.shape[-1])
        if pad is None:
            y, (h, c) = self.cell(x, (h0[None], c0[None]))
            h, c = h[0], c[0]
        else:  # each row over its real tokens only; padding outputs zeros and leaves the state alone
            y, hs, cs = torch.zeros_like(x), [], []
            for b in range(B):
                idx = pad[b].nonzero().squeeze(1)
                if idx.numel() == 0:
                    hs.append(h0[b])
                    cs.append(c0[b])
                    continue
                yb, (hb, cb) = self.cell(x[b:b + 1, idx], (h0[b:b + 1][None], c0[b:b + 1][None]))
                y[b, idx] = yb[0]
                hs.append(hb[0, 0])
                cs.append(cb[0, 0])
            h, c = torch.stack(hs), torch.stack(cs)
        if state is not None:
            state.h, state.c = h.float(), c.float()
        return y
