"""Test-wide settings: never touch a hub, deterministic seeds; the one tolerance rule of the suite; tiny models."""

import math
import os

import pytest
import torch
from helpers import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rel_tol(dtype: torch.dtype = torch.float32, terms: int = 1, factor: float = 16.0) -> float:
    """A relative tolerance from the dtype's epsilon and the reduction's length: `factor * eps * sqrt(terms)`.

    Two ways of computing the same thing (a chunked path and the plain one, another CPU's kernel blocking or
    ISA) round differently; summing `terms` products in another order moves the result by about
    `eps * sqrt(terms)` of its scale. `factor` is headroom for the few such reductions chained in a forward.
    """
    return factor * torch.finfo(dtype).eps * math.sqrt(max(terms, 1))


def assert_rel_close(actual, expected, rtol: float | None = None, *, dtype: torch.dtype = torch.float32,
                     terms: int = 1, msg: str = "") -> None:
    """Assert `max|actual - expected| <= rtol * max|expected|`: the error measured against the reference's scale.

    Tensors, numbers and arrays alike (compared in float64). `rtol` defaults to `rel_tol(dtype, terms)`; give it
    where a claim states its own (a parity bar, a quantizer's step). An all-zero reference needs exact zeros.
    """
    a = torch.as_tensor(actual).detach().cpu().double()
    e = torch.as_tensor(expected).detach().cpu().double()
    assert a.shape == e.shape, f"{msg} shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    rtol = rel_tol(dtype, terms) if rtol is None else rtol
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    assert diff <= rtol * scale, f"{msg} max|diff| {diff:.3g} > {rtol:.3g} * max|ref| {scale:.3g}".strip()


@pytest.fixture(scope="session")
def tiny_cfg():
    """`tiny_cfg(family, **overrides)`: the `tiny-<family>` preset with dotted overrides (`helpers.tiny.tiny_cfg`)."""
    return tiny.tiny_cfg


@pytest.fixture(scope="session")
def tiny_llm():
    """`tiny_llm(family, seed=0, *, train=False, **overrides)`: a random-weight tiny model built under a fixed seed,
    in eval mode unless `train` (`helpers.tiny.tiny_llm`)."""
    return tiny.tiny_llm
