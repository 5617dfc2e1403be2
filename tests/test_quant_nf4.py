"""NF4Linear: storage, error bound, double quantisation, gradients, state-dict round trip."""

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.quant import NF4_CODE, NF4Linear


def _linear(i=256, o=96, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


def test_nf4_code_is_sorted_with_exact_zero_and_ends():
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and NF4_CODE[7] == 0


@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_is_nearest_code_times_block_absmax(blocksize):
    lin = _linear()
    q = NF4Linear.from_linear(lin, blocksize=blocksize)
    assert (q.in_features, q.out_features) == (256, 96)
    w = lin.weight.detach()
    deq = q.dequantize()
    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    # every value is code * absmax for its block, with the nearest code (brute force reference)
    ref_idx = (blocks / absmax).unsqueeze(-1).sub(NF4_CODE).abs().argmin(-1)
    ref = NF4_CODE[ref_idx] * absmax
    torch.testing.assert_close(deq.reshape(-1, blocksize), ref, rtol=0, atol=1e-7)
    # error bound: half the widest gap between neighbouring codes, times the block's absmax
    gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    assert torch.all((deq - w).reshape(-1, blocksize).abs() <= gap * absmax + 1e-7)
    # the extremes of a block are represented exactly
    assert torch.allclose(deq.reshape(-1, blocksize).abs().amax(1), absmax.squeeze(1))
    # requantizing the dequantized weight gives the same codes
    q2 = NF4Linear.from_linear(nn.Linear(256, 96), blocksize=blocksize)
    q2.quantize_(deq)
    assert torch.equal(q2.codes, q.codes)


def test_double_quant_scales_close_and_smaller():
    lin = _linear(1024, 128)
    q = NF4Linear.from_linear(lin)
    dq = NF4Linear.from_linear(lin, double_quant=True)
    assert dq.absmax_q.dtype == torch.int8 and "absmax" not in dict(dq.named_buffers())
    rel = (dq.block_absmax() - q.block_absmax()).abs().max() / q.block_absmax().max()
    assert rel < 1 / 127
    bytes_q = sum(b.numel() * b.element_size() for b in q.state_dict().values())
    bytes_dq = sum(b.numel() * b.element_size() for b in dq.state_dict().values())
    assert bytes_dq < bytes_q
    err = (dq.dequantize() - lin.weight).abs().mean() / lin.weight.abs().mean()
    assert err < 0.12


def test_forward_matches_dequantized_linear_and_is_differentiable_in_x():
    lin = _linear(128, 64)
    q = NF4Linear.from_linear(lin, double_quant=True)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    ref = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in q.parameters())
    # relative output error against the float layer
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < 0.15
    # bf16 input works and gives a bf16 output
    assert q(x.detach().bfloat16()).dtype == torch.bfloat16


def test_state_dict_round_trip_and_odd_sizes():
    lin = _linear(33, 7, bias=False)  # 231 values: not a multiple of the block nor even
    q = NF4Linear.from_linear(lin, blocksize=64, double_quant=True)
    fresh = NF4Linear(33, 7, bias=False, blocksize=64, double_quant=True)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.dequantize(), q.dequantize())
    assert (q.dequantize() - lin.weight).abs().max() < lin.weight.abs().max() * 0.2


def test_bad_blocksize():
    with pytest.raises(ConfigError, match="block size"):
        NF4Linear.from_linear(nn.Linear(8, 8), blocksize=33)
