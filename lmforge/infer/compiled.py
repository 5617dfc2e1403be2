"""Opt-in compiled decode: one single-token forward over the static KV cache, compiled by `torch.compile`.

At batch 1 an eager decode step of SmolLM2-135M dispatches ~1,450 aten ops (30 layers of norms, rotary,
cache writes, casts and views around the matmuls), each with dispatcher and Python overhead that is a large
share of a 10-30 ms step. Inductor fuses the element-wise work into a few C++ loops per layer and, with its
C++ wrapper, calls the kernels without Python in between; the matmuls (packed int4/int8 kernels, float
GEMMs) stay library calls. The first call compiles (tens of seconds to minutes on 2 cores; later calls with
other lengths reuse it, as the cache length is a symbolic size), so it pays for long or repeated
generations. The result is close to, not bit-identical with, the eager step (fused loops round differently),
which is why it is off by default (`generate(..., compile=True)`, `lmforge generate --compile`).
"""

from __future__ import annotations

import copy
import time
import weakref

import torch

from lmforge import kernels
from lmforge.models import DecoderLM


class CompiledDecode:
    """`step(model, tokens (B, 1), cache) -> logits (B, V)` of the last position, compiled on first use.

    `compile_seconds` adds up the calls that compiled (the first ones, and a recompilation for a new batch
    size, dtype or padding)."""

    def __init__(self):
        self.compile_seconds = 0.0
        self._traced = False
        self._checked = False  # the first compiled step was compared with the eager one
        self._eager = False  # compiling failed or disagreed: decode eagerly
        self.choice: kernels.Choice | None = None
        self._fn = torch.compile(_step, dynamic=True, options={"cpp_wrapper": True})

    def __call__(self, model: DecoderLM, tokens: torch.Tensor, cache) -> torch.Tensor:
        stats = torch._dynamo.utils.counters["stats"]
        graphs, t = stats["unique_graphs"], time.perf_counter()
        if not self._traced:
            self._traced = True
            # the cache's capacity is a symbolic size from the start, so that a new max_len reuses the code
            for s in cache.layers:
                for name in ("k", "v"):
                    if isinstance(getattr(s, name, None), torch.Tensor):
                        torch._dynamo.maybe_mark_dynamic(getattr(s, name), 2)
            torch._dynamo.maybe_mark_dynamic(cache.key_mask, 1)
        if self._eager:
            return _step(model, tokens, cache)
        if self._checked:
            out = self._fn(model, tokens, cache)
        else:
            out = self._first_call(model, tokens, cache)
        if stats["unique_graphs"] != graphs:
            self.compile_seconds += time.perf_counter() - t
        return out

    def _first_call(self, model: DecoderLM, tokens: torch.Tensor, cache) -> torch.Tensor:
        """The first compiled step proves itself against the eager step on a copy of the cache, as the
        packed kernels' probes do (`lmforge.kernels`); a compile that fails or a result that differs beyond
        the fused loops' rounding makes this model decode eagerly from then on, with one line saying why."""
        twin = copy.deepcopy(cache)
        try:
            out = self._fn(model, tokens, cache)
        except Exception as e:  # no C++ compiler, an inductor failure: the eager step is always right
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            reason = f"torch.compile raised {type(e).__name__}: {first}"
            self._fall_back(reason)
            ref = _step(model, tokens, twin)
            _restore(cache, twin)
            return ref
        ref = _step(model, tokens, twin)
        err = kernels.rel_error(out.float(), ref.float())
        # bf16 models round every fused op to bf16; fp32 ones only differ in summation order
        tol = 4 * kernels.eps(out.dtype) if out.dtype != torch.float32 else 1e-4
        self._checked = True
        self.choice = kernels.Choice("compiled_decode", "torch.compile (inductor, C++ wrapper)", err <= tol,
                                     f"first step's relative error to the eager step {err:.2g} (allowed {tol:.2g})",
                                     err, tol, bool(torch.equal(out, ref)))
        if not self.choice.fast:
            self._fall_back(self.choice.reason)
            _restore(cache, twin)
            return ref
        return out

    def _fall_back(self, reason: str) -> None:
        self._eager = True
        self.choice = kernels.Choice("compiled_decode", "eager decode step", False, reason)
        kernels.log.warning("lmforge: compiled_decode: using the eager step; %s", reason)


def _restore(cache, twin):
    """Make `cache` hold `twin`'s state again (after a compiled step that must not count), in place."""
    cache.__dict__.update(twin.__dict__)
    return cache


def _step(model: DecoderLM, tokens: torch.Tensor, cache) -> torch.Tensor:
    return model(tokens, cache=cache, logits_to_keep=1)[:, -1]


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decode(model: DecoderLM) -> CompiledDecode:
    """The model's compiled decode step, made once per model (and forgotten with it)."""
    step = _STEPS.get(model)
    if step is None:
        # variants per batch size, padding and dtype: allow more than dynamo's default of 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        step = _STEPS[model] = CompiledDecode()
    return step
