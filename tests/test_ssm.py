"""State-space mixers: Mamba's chunked scan against its recurrence and against transformers' Mamba."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import assert_rel_close
from helpers.hf_parity import assert_hf_round_trip

from lmforge.errors import ConfigError
from lmforge.interop import hf
from lmforge.models import DecoderLM, make_model
from lmforge.models.mixers.mamba import selective_scan
from lmforge.presets import get_preset


def test_chunked_scan_equals_the_step_by_step_recurrence():
    torch.manual_seed(0)
    B, T, D, N = 2, 37, 8, 4
    x, C, Bm = torch.randn(B, T, D), torch.randn(B, T, N), torch.randn(B, T, N)
    dt = torch.rand(B, T, D) * 0.5
    A = -torch.rand(D, N) * 4
    h0 = torch.randn(B, D, N)
    y, hT = selective_scan(x, dt, A, Bm, C, h0)
    h, ys = h0, []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    assert_rel_close(y, torch.stack(ys, 1), terms=T * N)  # T steps of a state of N
    assert_rel_close(hT, h, terms=T)


def test_decode_state_does_not_grow_with_position():
    model = DecoderLM(get_preset("tiny-mamba"))
    assert model.new_cache(1, max_len=16).bytes() == model.new_cache(1, max_len=128).bytes()
    assert model.kv_bytes_per_token() == 0


def test_bad_ssm_config_is_refused():
    with pytest.raises(ConfigError, match="ssm.d_state must be a positive integer"):
        make_model(get_preset("tiny-mamba").replace(**{"ssm.d_state": 0}))


@pytest.mark.slow
def test_mamba_folder_import_export_matches_transformers(tmp_path):
    cfg = get_preset("tiny-mamba").replace(n_layer=2)
    torch.manual_seed(0)
    ref = transformers.MambaForCausalLM(transformers.MambaConfig(**hf.to_hf_config(cfg))).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    assert_hf_round_trip(ref, cfg.vocab_size, tmp_path)


def test_s4d_convolution_and_recurrence_agree():
    from lmforge.models.mixers.s4d import S4D, s4d_scan
    torch.manual_seed(0)
    mixer = S4D(get_preset("tiny-s4d"))
    dA, dB, C = mixer._discrete()
    u = torch.randn(2, 70, 64)
    y_conv, h_conv = s4d_scan(u, dA, dB, C, parallel=True)
    y_rec, h_rec = s4d_scan(u, dA, dB, C, parallel=False)
    assert_rel_close(y_conv, y_rec, terms=70 * 32)  # 70 steps, a state of 32
    assert_rel_close(h_conv, h_rec, terms=70)
    # a state carried in: the second half continues the first
    y1, h1 = s4d_scan(u[:, :30], dA, dB, C)
    y2, h2 = s4d_scan(u[:, 30:], dA, dB, C, h0=h1)
    assert_rel_close(torch.cat([y1, y2], 1), y_rec, terms=70 * 32)
    assert_rel_close(h2, h_rec, terms=70)
    with pytest.raises(ConfigError, match="even number for s4d"):
        make_model(get_preset("tiny-s4d").replace(**{"ssm.d_state": 7}))
