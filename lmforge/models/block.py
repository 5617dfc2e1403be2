"""One block of every model: a token mixer and a channel mixer with one norm/residual rule around them.

The rule is pre-norm (GPT-2, Llama), post-norm (teenyGPT, the original Transformer) or parallel (Falcon); a
decoder of an encoder-decoder adds a cross-attention sublayer between the two mixers.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import Config
from lmforge.models.layers import make_norm
from lmforge.models.mixers import channel_mixer, token_mixer
from lmforge.models.mixers.attention import CrossAttention
from lmforge.models.mixers.base import MixerContext


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    """One block: a token mixer and a channel mixer, each with a residual connection and a norm.

    The mixers sit under their own attribute names (`attn`, `mlp`, ...: see each class's `attr`), so
    state-dict keys read like the family's; `token_mixer` / `channel_mixer` reach them generically.
    The channel mixer may be absent ("none", as in Mamba): the block is then x + mixer(norm(x)).
    """

    def __init__(self, cfg: Config, layer: int = 0):
        super().__init__()
        token, channel = cfg.layer_mixers()[layer]
        self.placement = "parallel" if cfg.parallel_residual else cfg.norm.placement
        tcls, ccls = token_mixer(token), channel_mixer(channel)
        self.tname, self.cname = tcls.attr, ccls.attr if ccls else None
        self.norm_1 = make_norm(cfg)
        self.add_module(self.tname, tcls(cfg))
        if cfg.attention.cross:  # a decoder of an encoder-decoder: attend to the encoder's output in between
            self.norm_cross = make_norm(cfg)
            self.cross_attn = CrossAttention(cfg)
        else:
            self.cross_attn = None
        self.norm_2 = None if cfg.parallel_residual or ccls is None else make_norm(cfg)
        if ccls is not None:
            self.add_module(self.cname, ccls(cfg))
        self.drop = nn.Dropout(cfg.resid_dropout)

    @property
    def token_mixer(self) -> nn.Module:
        return self._modules[self.tname]

    @property
    def channel_mixer(self) -> nn.Module | None:
        return self._modules[self.cname] if self.cname else None

    def forward(self, x: torch.Tensor, ctx: MixerContext, state=None) -> torch.Tensor:
        # x: (B, T, C); state: this layer's decode state (from the cache) or None
        mix, ffn = self._modules[self.tname], self._modules[self.cname] if self.cname else None
        cross = self.cross_attn
        # dropout is the identity in eval: skipping the call saves two dispatches per layer and token at decode
        drop = self.drop if self.training and self.drop.p else _identity
        if self.placement == "pre":  # x + f(norm(x))
            x = x + drop(mix(self.norm_1(x), ctx, state))
            if cross is not None:
                x = x + drop(cross(self.norm_cross(x), ctx, state))
            return x if ffn is None else x + drop(ffn(self.norm_2(x), ctx, state))
        if self.placement == "post":  # norm(x + f(x))
            x = self.norm_1(x + drop(mix(x, ctx, state)))
            if cross is not None:
                x = self.norm_cross(x + drop(cross(x, ctx, state)))
            return x if ffn is None else self.norm_2(x + drop(ffn(x, ctx, state)))
        h = self.norm_1(x)  # parallel: x + mix(norm(x)) + ffn(norm(x))
        return x + drop(mix(h, ctx, state)) + drop(ffn(h, ctx, state))
