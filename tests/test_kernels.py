"""Fast CPU paths prove themselves where they run (`lmforge.kernels`): each probe passes or falls back to the
reference, a kernel forced to return garbage is caught and replaced (output stays right, one message), the 4-bit
layout is the machine's in memory and one canonical layout on disk, and `lmforge env` reports it all."""

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lmforge
from lmforge import kernels
from lmforge.infer import packed
from lmforge.quant import Int4Linear, Int8Linear, Q8Linear
from lmforge.quant.int4_layout import CANONICAL, KNOWN_LAYOUTS, int4_layout, pack_int4, unpack_int4, unpack_int4_rows

pytestmark = pytest.mark.cpu_kernels


@pytest.fixture
def fresh():
    """Probes run again in the test, and again after it (with the real kernels back)."""
    kernels.forget()
    yield
    kernels.forget()


def _garbage(*args, **kwargs):
    """A kernel that returns a tensor of the right shape and dtype but wrong values, as a wrong layout does."""
    real = _garbage.real(*args, **kwargs)
    return torch.randn_like(real.float()).to(real.dtype) * 3


def _patch(monkeypatch, namespace, name):
    _garbage.real = getattr(namespace, name)
    monkeypatch.setattr(namespace, name, _garbage)


def _linear(i=256, o=192, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def test_every_probe_decides_within_budget_and_passing_paths_are_accurate():
    choices = kernels.probe_all()
    assert set(choices) == set(kernels.PROBES)
    for path, c in choices.items():
        assert c.kernel and c.reason, path
        assert c.ms < 1000, (path, c.ms)  # the target is 50 ms on a quiet machine; this only catches a runaway
        if c.fast:
            assert c.error is not None and c.error <= c.tolerance, (path, c)


@pytest.mark.parametrize("layout", KNOWN_LAYOUTS, ids=lambda lay: lay.name)
def test_pack_unpack_round_trip_in_every_layout(layout):
    q = torch.randint(0, 16, (100, 96))
    p = pack_int4(q, layout)
    assert p.shape == (128, 48)
    assert torch.equal(unpack_int4(p, 100, 96, layout), q.to(torch.uint8))
    rows = torch.tensor([[0, 33], [99, 17]])
    assert torch.equal(unpack_int4_rows(p, rows, 96, layout), q.to(torch.uint8)[rows])


def test_layout_in_memory_is_the_kernels_and_the_file_holds_the_canonical_one(tmp_path, fresh):
    choice = kernels.probe("int4")
    if choice.fast:  # where the kernel runs, memory holds exactly what torch's converter writes
        q = torch.randint(0, 16, (128, 64))
        assert torch.equal(pack_int4(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
    llm = lmforge.load("preset:tiny-llama").quantize("int4")
    layer = llm.model.blocks[0].attn.qkv
    llm.save(tmp_path / "q")
    saved = load_file(str(tmp_path / "q" / "model.safetensors"))["blocks.0.attn.qkv.qweight"]
    values = unpack_int4(layer.qweight, layer.out_features, layer.in_features)
    assert torch.equal(saved, pack_int4(values, CANONICAL))
    want = llm.model.blocks[0].attn.qkv.dequantize()

    # the same file read on a machine whose kernel reads another layout (its probe chose it)
    other = next(lay for lay in KNOWN_LAYOUTS if lay != int4_layout())
    kernels._CHOICES["int4"] = kernels.Choice("int4", "reference: dequantize + F.linear", False, "test", detail=other)
    again = lmforge.load(tmp_path / "q")
    moved = again.model.blocks[0].attn.qkv
    assert torch.equal(moved.qweight, pack_int4(values, other))
    assert torch.equal(moved.dequantize(), want)
    again.save(tmp_path / "r")  # and written back: the same bytes
    assert torch.equal(load_file(str(tmp_path / "r" / "model.safetensors"))["blocks.0.attn.qkv.qweight"], saved)


@pytest.mark.parametrize("make", [lambda lin: Int4Linear.from_linear(lin, 32), Q8Linear.from_linear],
                         ids=["int4", "q8_0"])
def test_int4_kernel_returning_garbage_is_caught_and_the_layer_stays_right(make, monkeypatch, caplog, fresh):
    _patch(monkeypatch, torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    with caplog.at_level(logging.WARNING, logger="lmforge.kernels"):
        layer = make(_linear())
        kernels.probe("int4")
    choice = kernels.choices()["int4"]
    assert not choice.fast and choice.kernel.startswith("reference") and "failed its probe" in choice.reason
    assert [r.getMessage() for r in caplog.records].count(next(r.getMessage() for r in caplog.records)) == 1
    assert len(caplog.records) == 1  # told once, however many layers
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))


def test_int8_kernels_returning_garbage_are_caught(monkeypatch, fresh):
    lin = _linear()
    x1, x3 = torch.randn(1, 256), torch.randn(3, 256)
    _patch(monkeypatch, torch.ops.quantized, "linear_dynamic")
    layer = Int8Linear.from_linear(lin)
    with torch.no_grad():
        y1, y3 = layer(x1), layer(x3)
    assert not kernels.choices()["int8_integer"].fast and layer._w8a8[1] is None
    # one row takes the bf16-activation kernel instead: within bf16's rounding of the dequantized product
    ref1 = F.linear(x1, layer.dequantize(), layer.bias)
    assert kernels.rel_error(y1, ref1) <= kernels.choices()["int8"].tolerance
    assert kernels.rel_error(y3, F.linear(x3, layer.dequantize(), layer.bias)) <= kernels.choices()["int8"].tolerance
    kernels.forget()
    _patch(monkeypatch, torch.ops.aten, "_weight_int8pack_mm")
    layer = Int8Linear.from_linear(lin)
    with torch.no_grad():
        assert torch.equal(layer(x3), F.linear(x3, layer.dequantize(), layer.bias))
    assert not kernels.choices()["int8"].fast


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm (e.g. ARM)")
def test_w8a8_probe_takes_7_bit_activations_where_8_bit_sums_overflow(monkeypatch, fresh):
    real = torch.ops.quantized.linear_dynamic

    def saturating(x, packed, reduce_range=False):  # as fbgemm's AVX2 path without VNNI: 16-bit pair sums clip
        y = real(x, packed, reduce_range)
        return y if reduce_range else y * 0.9

    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic", saturating)
    c = kernels.probe("int8_integer")
    assert c.fast and c.detail is True and "7-bit" in c.kernel and "8-bit activations did not" in c.reason
    layer = Int8Linear.from_linear(_linear())
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = layer(x)
    assert layer._reduce_range
    ref = F.linear(x, layer.dequantize(), layer.bias)
    assert kernels.rel_error(y, ref) < 0.03  # 7-bit activations: twice 8-bit's 0.6-0.8%


@pytest.mark.parametrize("dtype,path,name", [
    (torch.bfloat16, "onednn_bf16", "_linear_pointwise"),
    (torch.float32, "mkl_fp32", "_mkl_linear"),
])
def test_packed_linear_kernels_returning_garbage_are_caught(dtype, path, name, monkeypatch, fresh, tiny_llm):
    if (path == "mkl_fp32" and not torch._C.has_mkl) or not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build lacks the library (e.g. ARM): the probe already picks F.linear")
    namespace = torch.ops.mkldnn if path.startswith("onednn") else torch.ops.mkl
    _patch(monkeypatch, namespace, name)
    model = tiny_llm("gpt2").to(dtype)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        plain = model(x)
        packed.pack_linears(model)
        assert torch.equal(model(x), plain)  # the fallback is F.linear itself
    assert not kernels.choices()[path].fast and model.blocks[0].attn.qkv._kind == "plain"


def test_blas_decode_returning_garbage_is_caught(monkeypatch, fresh):
    real = packed._blas_linear
    monkeypatch.setattr(packed, "_blas_linear", lambda x, w, b: real(x, w, b) + 1)
    monkeypatch.setenv("LMFORGE_BLAS_DECODE", "1")  # even when forced on
    assert not packed.blas_decode_helps(torch.zeros(4, 4))
    assert not kernels.choices()["blas_decode"].fast


def test_compiled_decode_that_fails_or_disagrees_decodes_eagerly(monkeypatch, caplog, tiny_llm):
    from lmforge.infer import compiled
    from lmforge.infer.generate import GenerationConfig, generate_ids

    model = tiny_llm("llama")
    prompts = [[5, 17, 99, 3]]
    eager = generate_ids(model, prompts, GenerationConfig(max_new_tokens=8, temperature=0))
    gen = GenerationConfig(max_new_tokens=8, temperature=0, compile=True)

    def broken(fn, **kwargs):
        return lambda model, tokens, cache: fn(model, tokens, cache) * 0 + 7  # compiles, computes wrong

    monkeypatch.setattr(compiled.torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="lmforge.kernels"):
        assert generate_ids(model, prompts, gen) == eager
        assert generate_ids(model, prompts, gen) == eager
    step = compiled._STEPS[model]
    assert step._eager and not step.choice.fast
    assert len(caplog.records) == 1 and "relative error" in caplog.records[0].getMessage()

    def raising(fn, **kwargs):
        def f(*a):
            raise RuntimeError("no C++ compiler found")
        return f

    monkeypatch.setattr(compiled.torch, "compile", raising)
    del compiled._STEPS[model]
    assert generate_ids(model, prompts, gen) == eager
    assert "no C++ compiler" in compiled._STEPS.pop(model).choice.reason


@pytest.mark.slow
def test_env_reports_cpu_kernels_and_probes_as_text_and_json():
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmforge", "env", "--json"], capture_output=True, text=True,
                          timeout=120)
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["cpu"]["model"] and isinstance(info["cpu"]["isa"], list) and info["cpu"]["cores"] >= 1
    assert info["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch"]["threads"] >= 1 and "onednn" in info["torch"] and "mkl" in info["torch"]
    assert "blas" in info["numpy"] and isinstance(info["precision"]["bf16_native"], bool)
    assert set(info["kernels"]) == set(kernels.PROBES)
    for c in info["kernels"].values():
        assert {"kernel", "fast", "reason", "error", "tolerance", "exact", "ms"} <= set(c)
    assert info["fp32_decode"]["blas"] and info["fp32_decode"]["torch_us"] > 0
    # the target is 2 s on an idle machine; a loaded CI machine gets slack, a hang does not
    assert wall < 30, wall
    text = subprocess.run([sys.executable, "-m", "lmforge", "env"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "CPU capability" in text.stdout and "int4" in text.stdout
    assert np.isfinite(sum(c["ms"] for c in info["kernels"].values()))


def test_speed_decisions_are_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return {"torch_us": 100.0, "openblas_us": 40.0}

    assert kernels.remembered("gemv_fp32", measure) == {"torch_us": 100.0, "openblas_us": 40.0}
    assert kernels.remembered("gemv_fp32", measure)["openblas_us"] == 40.0 and len(calls) == 1
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert len(saved) == 1 and next(iter(saved)).startswith("gemv_fp32|" + kernels.cpu_model())
    monkeypatch.setattr(packed, "_MKL_THREADS_GEMV", None)
    assert packed._mkl_threads_gemv() is False  # OpenBLAS measured faster here: decode lends it the threads
    (tmp_path / "kernels.json").write_text("not json")  # a damaged cache is measured again, not fatal
    assert kernels.remembered("gemv_fp32", measure) and len(calls) == 2


def test_many_rows_take_dequantize_where_it_measured_faster_than_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    calls = []

    def timing(cls):
        calls.append(cls)
        return {"kernel_us": 900.0, "dequantize_us": 100.0}  # as PyTorch's generic int4 kernel measured

    from lmforge.quant import linear

    monkeypatch.setattr(linear, "_time_many_rows", timing)
    layer = Int4Linear.from_linear(_linear(), 32)
    x1, x20 = torch.randn(1, 256), torch.randn(20, 256)
    with torch.no_grad():
        ref = F.linear(x20, layer.dequantize(), layer.bias)
        assert torch.equal(layer(x20), ref)  # many rows: dequantize + F.linear, bit for bit
        one = layer(x1)  # one row (decode) still takes the kernel where its probe passed
    if kernels.fast("int4"):
        assert not torch.equal(one, F.linear(x1, layer.dequantize(), layer.bias))
    assert calls == [Int4Linear]
    Int4Linear.from_linear(_linear(seed=1), 32)(x20)  # measured once per machine, not per layer
    assert calls == [Int4Linear]
