"""Prepacked linear layers for CPU inference: a drop-in replacement for `nn.Linear`.

At batch-1 decode every weight is read once per token, so decode speed is the speed of matrix-vector
products. oneDNN (bf16) and MKL (fp32) multiply faster from weights reordered once into their blocked
layouts than from a plain row-major matrix, which `F.linear` uses as it is. Measured on 2 cores
(AVX-512), one thread, one token through a 50257 x 768 LM head: fp32 17.4 ms -> 8.5 ms, bf16 12.9 ms ->
6.8 ms; a 3072 x 768 bf16 MLP weight 205 us -> 99 us (bench/README.md has whole-model figures).

`pack_linears(model)` swaps each `nn.Linear` for a `PackedLinear`: a subclass holding the very same
`weight` and `bias` parameters (state dict keys, tied weights and optimizers are unaffected) plus a
packed copy used when no gradient is needed. An in-place change of a weight (an optimizer step,
`load_state_dict`) or a new storage (`.to(dtype)`) is noticed and the copy rebuilt on the next call.

`pack_linears(model, many_rows=True)` packs for products of many rows instead (an encoder embedding a
sentence, a prompt): fp32 weights then go to oneDNN's blocked layout too. MKL's packed fp32 product only
serves the row count it was packed for, and a plain `F.linear` repacks the weight on every call, which at
10-60 rows costs as much as the multiplication: measured on the Xeon (2 threads, fp32), a 1536 -> 384
product of 16 rows went from 110 to 219 GFLOP/s, of 55 rows from 201 to 276, of 100 rows 282 -> 285.
oneDNN also applies an activation inside the product (`fused`), which saves the MLP a pass over its
widest tensor. At one row the oneDNN layout is slower than MKL's (576 -> 960: 18 us against 26-29 us),
so decoding keeps the default.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import kernels


def _pack_kind(weight: torch.Tensor, many_rows: bool) -> str:
    """"onednn", "fp32" (MKL) or "plain" for a weight: the packed kernel that passed its probe here."""
    if weight.device.type != "cpu":
        return "plain"
    if weight.dtype == torch.bfloat16:
        return "onednn" if kernels.fast("onednn_bf16") else "plain"
    if weight.dtype != torch.float32:
        return "plain"
    if many_rows and kernels.fast("onednn_fp32"):  # the row count is only a hint to oneDNN
        return "onednn"
    return "fp32" if kernels.fast("mkl_fp32") else "plain"


# ---- probes: each packed kernel against F.linear, on this machine ---------------------------------------

def _linear_case(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 256, generator=gen) / 16).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    x = torch.randn(5, 256, generator=gen).to(dtype)
    return w, b, x


def _rows(fn, x: torch.Tensor) -> torch.Tensor:
    """fn over one row (decode) and over the other rows (prefill): different kernels inside the libraries."""
    return torch.cat([fn(x[:1]), fn(x[1:])])


def _probe_onednn(dtype: torch.dtype) -> kernels.Choice:
    path = "onednn_bf16" if dtype == torch.bfloat16 else "onednn_fp32"
    w, b, x = _linear_case(dtype)
    ref = torch.cat([F.linear(x, w, b), F.gelu(F.linear(x, w, b))])
    tol = 2 * kernels.eps(dtype) if dtype == torch.bfloat16 else 64 * kernels.eps(dtype)

    def fast():
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("this PyTorch build has no oneDNN")
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        plain = _rows(lambda r: torch.ops.mkldnn._linear_pointwise(r, packed, b, "none", [None], ""), x)
        gelu = _rows(lambda r: torch.ops.mkldnn._linear_pointwise(r, packed, b, "gelu", [], "none"), x)
        return torch.cat([plain, gelu])

    return kernels.compare(path, f"oneDNN prepacked {'bf16' if dtype == torch.bfloat16 else 'fp32'} linear", fast,
                           ref, tol, "F.linear")


def probe_onednn_bf16() -> kernels.Choice:
    """Whether bf16 linears multiply from oneDNN-prepacked weights here (else plain `F.linear`)."""
    return kernels.choose("onednn_bf16", lambda: _probe_onednn(torch.bfloat16))


def probe_onednn_fp32() -> kernels.Choice:
    """Whether fp32 linears packed for many rows use oneDNN's blocked layout here (else MKL / `F.linear`)."""
    return kernels.choose("onednn_fp32", lambda: _probe_onednn(torch.float32))


def _probe_mkl() -> kernels.Choice:
    w, b, x = _linear_case(torch.float32)

    def fast():
        if not torch._C.has_mkl:
            raise RuntimeError("this PyTorch build has no MKL")
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
        return _rows(lambda r: torch.ops.mkl._mkl_linear(r, packed, w, b, 1), x)

    return kernels.compare("mkl_fp32", "MKL prepacked fp32 linear", fast, F.linear(x, w, b),
                           64 * kernels.eps(torch.float32), "F.linear")


def probe_mkl_fp32() -> kernels.Choice:
    """Whether fp32 decode linears multiply from MKL-prepacked weights here (else plain `F.linear`)."""
    return kernels.choose("mkl_fp32", _probe_mkl)


def _probe_blas() -> kernels.Choice:
    w, b, x = _linear_case(torch.float32)
    if _openblas() is None:
        return kernels.Choice("blas_decode", "PyTorch's own matmul", False, "numpy's OpenBLAS not found")
    wn = w.numpy()
    return kernels.compare("blas_decode", "numpy's OpenBLAS (fp32 decode)", lambda: _rows(
        lambda r: _blas_linear(r, wn, b), x), F.linear(x, w, b), 64 * kernels.eps(torch.float32),
        "PyTorch's own matmul")


def probe_blas_decode() -> kernels.Choice:
    """Whether fp32 decode steps may multiply through numpy's OpenBLAS here."""
    return kernels.choose("blas_decode", _probe_blas)


class PackedLinear(nn.Linear):
    """`nn.Linear` that multiplies from a copy of its weight prepacked for MKL (fp32) or oneDNN (bf16)."""

    def __init__(self, linear: nn.Linear, many_rows: bool = False):
        nn.Module.__init__(self)  # not nn.Linear's: the parameters are shared, not created
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: torch.Tensor | None = None
        self._wnp: np.ndarray | None = None
        self._packed_key: tuple | None = None
        # "onednn" (bf16 always, fp32 when packed for many rows), "fp32" (MKL) or "plain" (F.linear),
        # set with the packed copy
        self._kind = "plain"
        self.many_rows = many_rows

    def set_many_rows(self, many_rows: bool) -> None:
        """Pack for products of many rows (oneDNN, fp32 included) or for decoding (MKL for fp32)."""
        if many_rows != self.many_rows:
            self.many_rows, self._packed, self._wnp, self._packed_key, self._kind = many_rows, None, None, None, "plain"

    def _repack(self, key: tuple) -> None:
        w = self.weight
        with torch.no_grad():
            kind = _pack_kind(w, self.many_rows)
            if kind == "plain":
                self._packed, self._kind = None, "plain"
            elif kind == "onednn":
                rows = 64 if self.many_rows else 1
                self._packed, self._kind = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows), "onednn"
            else:
                self._packed, self._kind = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), 1), "fp32"
                self._wnp = w.detach().numpy()  # a view of the weight for `_blas_linear`, made once, not per call
        self._packed_key = key

    def _kind_for(self, x: torch.Tensor) -> str:
        """How to multiply `x`: "plain" where the packed copy cannot serve, else the packed copy's kind
        (rebuilt first if the weight changed)."""
        w = self.weight
        if torch.compiler.is_compiling():  # a compiled step: inductor picks (and may pack for) the matmul
            return "plain"
        # the packed kernels have no backward: any gradient through here (into the weight, or back into
        # the input, e.g. frozen layers under LoRA) takes the plain path
        if x.dtype != w.dtype or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return "plain"
        key = (w.data_ptr(), w._version)  # a new dtype or device is a new storage, hence a new data_ptr
        if key != self._packed_key:
            self._repack(key)
        return self._kind

    def fused(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """act(x @ W^T + b) in one oneDNN call, for `activation` "gelu", "gelu_tanh" or "relu", when packed
        for many rows; None otherwise (the caller then applies the activation itself). oneDNN's activation
        rounds differently from PyTorch's (fp32: ~1e-7), so decoding, which must not change, never fuses."""
        post = _ONEDNN_ACT.get(activation)
        if post is None or not self.many_rows or self._kind_for(x) != "onednn":
            return None
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, post[0], [], post[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode calls this ~100 times per token, so the common path is kept to a few attribute reads
        kind = self._kind_for(x)
        w = self.weight
        if kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [None], "")
        if kind == "plain":
            return F.linear(x, w, self.bias)
        shape = x.shape
        if getattr(_blas, "active", False) and x.numel() <= _BLAS_MAX_ROWS * shape[-1]:
            return _blas_linear(x.reshape(-1, shape[-1]), self._wnp, self.bias).view(*shape[:-1], self.out_features)
        y = torch.ops.mkl._mkl_linear(x.reshape(-1, shape[-1]), self._packed, w, self.bias, 1)
        return y.view(*shape[:-1], self.out_features)


# MLP activations (`lmforge.config` names) oneDNN applies inside the product: (post-op, algorithm)
_ONEDNN_ACT = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def pack_linears(model: nn.Module, many_rows: bool = False) -> nn.Module:
    """Swap every `nn.Linear` in `model` for a `PackedLinear`, in place (idempotent). Returns the model.

    many_rows: pack for products of many rows (encoders, prompts) rather than for one-token decode steps;
    layers packed before are switched to the asked layout (rebuilt on their next call)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            setattr(model, name, PackedLinear(child, many_rows))
        elif isinstance(child, PackedLinear):
            child.set_many_rows(many_rows)
        else:
            pack_linears(child, many_rows)
    return model


# ---- fp32 decode through numpy's BLAS ----------------------------------------------------------------
#
# MKL, as PyTorch's CPU wheels call it, computes a matrix-vector product on one thread (about 14-18 GB/s
# of weights here, prepacked or not) while OpenBLAS, bundled with numpy, splits it across its threads
# (32 GB/s with 2). The two thread pools must not spin against each other (both busy-wait between calls:
# 2 OpenMP + 2 OpenBLAS threads on 2 cores made decoding 10x slower), so `blas_decode()` lends the
# threads to OpenBLAS and runs PyTorch's own ops on one thread for as long as it is active.

_BLAS_MAX_ROWS = 16
_MKL_THREADS_GEMV: bool | None = None


def _mkl_threads_gemv() -> bool:
    """Whether PyTorch's own matrix-vector product (MKL) is about as fast here as numpy's OpenBLAS on the same
    threads, so that decoding needs no `blas_decode`.

    It differs by CPU: on the Xeon with AMX of 2026-12-03 MKL spread a product over its threads (one token of
    SmolLM2 fp32: 37.7 ms against 43.0 through OpenBLAS), on the AMD EPYC of 2026-11-23 it ran on one thread at
    13-18 GB/s, half of OpenBLAS's two. So it is measured (a 6 MB fp32 weight times one row, both ways,
    interleaved, best of each), once per machine: the answer is kept in lmforge's cache folder by CPU model,
    threads and torch version, so that a machine always takes the same path (the two BLAS round differently)."""
    global _MKL_THREADS_GEMV
    if _MKL_THREADS_GEMV is None:
        r = kernels.remembered("gemv_fp32", _time_gemv)
        _MKL_THREADS_GEMV = not r["openblas_us"] < 0.85 * r["torch_us"]
    return _MKL_THREADS_GEMV


def _time_gemv() -> dict:
    """Microseconds of one fp32 row times a 1536 x 1024 weight: PyTorch's own product, and OpenBLAS's under
    `blas_decode`."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(1536, 1024, generator=gen), torch.randn(1, 1024, generator=gen)
    wn = w.numpy()
    best = {"torch_us": float("inf"), "openblas_us": float("inf")}
    if _openblas() is None:
        return {"torch_us": 1.0, "openblas_us": float("inf")}
    with torch.no_grad():
        for _ in range(6):
            t = time.perf_counter()
            for _ in range(8):
                F.linear(x, w)
            best["torch_us"] = min(best["torch_us"], (time.perf_counter() - t) / 8 * 1e6)
            with blas_decode():
                _blas_linear(x, wn, None)  # wakes OpenBLAS's threads
                t = time.perf_counter()
                for _ in range(8):
                    _blas_linear(x, wn, None)
                best["openblas_us"] = min(best["openblas_us"], (time.perf_counter() - t) / 8 * 1e6)
    return {k: round(v, 1) for k, v in best.items()}


def blas_decode_helps(weight: torch.Tensor, rows: int = 1) -> bool:
    """Whether a decode step of `rows` rows over weights like `weight` should run under `blas_decode`:
    fp32 CPU weights, at most 16 rows, on a CPU where MKL's matrix-vector product is single-threaded.
    `LMFORGE_BLAS_DECODE=1` / `=0` forces it on / off for fp32 CPU weights; on never overrides a failed
    probe of the BLAS path."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or rows > _BLAS_MAX_ROWS:
        return False
    forced = os.environ.get("LMFORGE_BLAS_DECODE", "")
    if forced == "0" or not kernels.fast("blas_decode"):
        return False
    return forced == "1" or not _mkl_threads_gemv()


def blas_decode_for(model: nn.Module, rows: int = 1) -> bool:
    """`blas_decode_helps` for a model's decode step of `rows` rows: its weights as the embedding table's,
    and no quantized layers (they compute on PyTorch's own threads, which `blas_decode` takes down to one)."""
    from lmforge.quant import is_quantized

    return blas_decode_helps(model.tok_emb.weight, rows) and not is_quantized(model)


_blas = threading.local()


def _openblas():
    """numpy's OpenBLAS thread controller, or None (another BLAS, or threadpoolctl missing)."""
    global _OPENBLAS
    if _OPENBLAS is False:
        try:
            from threadpoolctl import ThreadpoolController
            libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
            # numpy's own copy (its wheels bundle one under numpy.libs); another package's OpenBLAS is not
            # the one `np.dot` calls
            _OPENBLAS = next((lib for lib in libs if "numpy" in lib.filepath), None)
        except Exception:  # pragma: no cover - no threadpoolctl / unusual numpy build
            _OPENBLAS = None
    return _OPENBLAS


_OPENBLAS = False


@contextmanager
def blas_decode(enabled: bool = True) -> Iterator[None]:
    """Within this block, fp32 `PackedLinear`s with at most 16 rows multiply through numpy's OpenBLAS on
    all of PyTorch's intra-op threads, and PyTorch itself runs on one thread. Used around decode steps of
    fp32 models on the CPU; `enabled=False` (or no OpenBLAS) makes it a no-op."""
    lib = _openblas() if enabled and not getattr(_blas, "active", False) else None
    if lib is None:
        yield
        return
    threads = torch.get_num_threads()
    if lib.num_threads != threads:
        lib.set_num_threads(threads)
    torch.set_num_threads(1)
    _blas.active = True
    try:
        yield
    finally:
        _blas.active = False
        torch.set_num_threads(threads)


def _blas_linear(x: torch.Tensor, wn: np.ndarray, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ bias) for a few fp32 rows, computed by numpy's BLAS on tensors shared without copies
    (`wn`: the weight as a numpy view)."""
    xn = (x.detach() if x.requires_grad else x).numpy()
    y = torch.from_numpy(wn.dot(xn[0])[None] if xn.shape[0] == 1 else np.dot(xn, wn.T))
    return y.add_(bias) if bias is not None else y
