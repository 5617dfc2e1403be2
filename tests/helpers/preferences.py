"""Shared piece of the alignment tests: a small preference set a tiny model can learn."""

import torch

from lmforge.align import Pair


def toy_pairs(n=32, seed=0):
    """Chosen responses repeat the prompt's last token, rejected ones are unrelated: a learnable preference."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(10, 200, (6,), generator=g).tolist()
        out.append(Pair(p, [p[-1], p[-1]], torch.randint(200, 250, (2,), generator=g).tolist()))
    return out
