"""The complexity study's machinery (the numbers themselves come from bench/complexity.py)."""

from __future__ import annotations

import pytest
import torch

from lmforge.commands.evaluate import bench
from lmforge.errors import ConfigError
from lmforge.evaluate import complexity as cx
from lmforge.evaluate.moe import moe_vs_dense
from lmforge.models import DecoderLM


def test_fit_exponent_recovers_a_power_law():
    xs = [256, 512, 1024, 2048]
    assert cx.fit_exponent(xs, [3 * x ** 2 for x in xs]) == pytest.approx(2.0)
    assert cx.fit_exponent(xs, [5.0] * 4) == pytest.approx(0.0)
    assert cx.fit_exponent([1], [1]) is None


@pytest.mark.slow
def test_families_are_matched_and_their_state_grows_as_claimed(tmp_path):
    with torch.device("meta"):  # the benchmark's shape
        params = {n: DecoderLM(c, init_weights=False).num_params(non_embedding=True)
                  for n, c in cx.family_configs(context=512).items()}
    assert set(params) == set(cx.SEED_CLAIMS) and max(params.values()) / min(params.values()) < 1.1, params
    study = cx.run_study(train_lengths=(32, 64), positions=(32, 96), d_model=64, n_layer=2, log=lambda s: None)
    fams = study["families"]
    assert fams["transformer"]["fit"]["decode_mem"] > 0.8  # the KV cache grows with position
    assert fams["lsh"]["fit"]["decode_mem"] > 0.8  # so does LSH attention's key/value/bucket cache
    for name in ("mamba", "linear", "s4d", "retnet", "rwkv"):
        assert fams[name]["fit"]["decode_mem"] == 0, name
    assert all(r["train_mem_bytes"] > 0 for f in fams.values() for r in f["train"])
    assert "| mamba |" in cx.table(study)
    assert cx.plot(study, tmp_path / "c.png").stat().st_size > 5000


def test_saved_bytes_counts_what_backward_keeps():
    w = torch.randn(100, 100, requires_grad=True)
    n, out = cx.saved_bytes(lambda: (torch.randn(10, 100) @ w).relu().sum())
    assert n >= 10 * 100 * 4 and out.requires_grad


def test_unknown_benchmark_is_refused():
    with pytest.raises(ConfigError, match="available: complexity, moe, decode"):
        bench("speed")


def test_decode_vs_dense_compares_matched_models_round_by_round():
    logged = []
    res = cx.decode_vs_dense(positions=(8, 24), d_model=256, n_layer=2, steps=2, rounds=2, log=logged.append)
    p = res["params"]
    assert max(p.values()) / min(p.values()) < 1.1, p  # matched parameter count
    assert set(res["positions"]) == {8, 24} and len(logged) == 2
    for row in res["positions"].values():
        assert row["mamba_ms"] > 0 and row["transformer_ms"] > 0
        assert row["ratio"] == pytest.approx(row["mamba_ms"] / row["transformer_ms"])


@pytest.mark.slow
def test_moe_vs_dense_runs_twice_into_one_folder(tmp_path):
    # the training runs are scratch: a re-run must not trip over the first run's checkpoints
    for _ in range(2):
        res = moe_vs_dense(tmp_path, steps=2, batch=2, seq_len=16, d_model=64, log=lambda _: None)
    assert res["moe"]["tok_s"] > 0 and res["dense"]["tok_s"] > 0
    assert abs(res["moe"]["active_flops_per_token"] / res["dense"]["active_flops_per_token"] - 1) < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe_vs_dense.json", "moe_vs_dense.png"]
