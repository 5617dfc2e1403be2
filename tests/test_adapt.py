"""LoRA / DoRA module swaps: parity with peft, adapter files both ways, merge/un-merge, toggling, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import assert_rel_close, rel_tol
from helpers.tiny import tiny_llm

from lmforge.adapt import (
    LoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameters,
    unmerge_adapters,
)
from lmforge.errors import ConfigError, FormatError
from lmforge.llm import LLM, load
from lmforge.models import DecoderLM

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
TARGETS = {"tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "tiny-gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]}


def _base(preset="tiny-llama", seed=0):
    return tiny_llm(preset, seed)


def _hf(model, folder):
    LLM(model).save(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _sha(model):
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("dora", [False, True])
def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path, preset, dora):
    model = _base(preset)
    hf = _hf(model, tmp_path / "base")
    apply_lora(model, r=4, alpha=8, target_modules=TARGETS[preset], dora=dora)
    _randomize(model)
    save_adapter(model, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(IDS), pm(IDS).logits
    assert_rel_close(ours, theirs, terms=256)  # fp32 logits, another library's order of the same sums
    with torch.no_grad(), pm.disable_adapter():
        base = pm(IDS).logits
    assert (ours - base).abs().max().item() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_lmforge_with_the_same_outputs(tmp_path, dora):
    model = _base()
    hf = _hf(model, tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        theirs = pm(IDS).logits
    load_adapter(model, tmp_path / "theirs")
    with torch.no_grad():
        ours = model(IDS)
    assert_rel_close(ours, theirs, terms=256)  # fp32 logits, another library's order of the same sums
    assert trainable_parameters(model)["adapter_layers"] == 4  # 2 qkv (q, v slices) + 2 down_proj


def test_merge_then_unmerge_restores_the_base_bit_exactly_and_toggle_gives_the_base():
    model = _base()
    with torch.no_grad():
        base_out = model(IDS)
    before = _sha(model)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], dora=True)
    _randomize(model)
    with torch.no_grad():
        adapted = model(IDS)
        with disable_adapters(model):
            off = model(IDS)
    assert torch.equal(off, base_out)  # adapters off: exactly the base
    merge_adapters(model)
    with torch.no_grad():
        merged = model(IDS)
        with disable_adapters(model):  # works on a merged model too
            assert torch.equal(model(IDS), base_out)
    assert_rel_close(merged, adapted, terms=256)  # merging rounds W + BA once per weight
    assert any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    unmerge_adapters(model)
    from lmforge.adapt import base_state_dict

    after = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in base_state_dict(model).items()}
    assert after == before


def test_only_adapters_train_and_the_report_counts_them():
    model = _base()
    total = model.num_params()
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    rep = trainable_parameters(model)
    cfg = model.config
    per_layer = 2 * (cfg.d_model * 2 + 2 * cfg.n_head * cfg.head_dim) // 2  # A (r, d) + B (out, r), q and v
    expect = cfg.n_layer * (2 * 2 * cfg.d_model + 2 * (cfg.n_head + cfg.n_kv_head) * cfg.head_dim)
    assert rep["trainable"] == expect and per_layer > 0
    assert rep["total"] == total + expect
    frozen = _sha(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    now = _sha(model)
    changed = {k for k in now if now[k] != frozen[k]}
    assert changed and all("lora_" in k for k in changed)


def test_save_and_load_a_model_folder_with_adapters(tmp_path):
    model = _base()
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    _randomize(model)
    LLM(model).save(tmp_path / "m")
    assert (tmp_path / "m" / "adapter_config.json").is_file()
    back = load(tmp_path / "m").model
    with torch.no_grad():
        assert torch.equal(back(IDS), model(IDS))
    # transformers (with peft installed) reads the folder as base + adapter too
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_rel_close(hf(IDS).logits, model(IDS), terms=256)


def test_bad_input_is_named(tmp_path, tiny_cfg):
    model = _base()
    with pytest.raises(ConfigError, match=r"match no layer.*q_proj"):
        apply_lora(model, target_modules=["q_prj"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was changed
    apply_lora(model, r=4, target_modules=["q_proj"])
    save_adapter(model, tmp_path / "a")
    other = DecoderLM(tiny_cfg("llama", d_model=96)).eval()
    with pytest.raises(FormatError, match="different base model: d_model 64"):
        load_adapter(other, tmp_path / "a")
    # a peft file without our header: the shapes tell
    meta_free = tmp_path / "b"
    meta_free.mkdir()
    from safetensors.torch import load_file, save_file

    save_file(load_file(tmp_path / "a" / "adapter_model.safetensors"), meta_free / "adapter_model.safetensors")
    (meta_free / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    with pytest.raises(FormatError, match="has shape"):
        load_adapter(other, meta_free)
    gpt = DecoderLM(tiny_cfg("gpt2")).eval()
    with pytest.raises(FormatError, match="does not have"):
        load_adapter(gpt, meta_free)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (meta_free / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(FormatError, match="peft_type"):
        load_adapter(other, meta_free)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_base_is_within_the_nf4_codebook_error(double_quant):
    from lmforge.adapt import apply_qlora
    from lmforge.quant import NF4_CODE, NF4Linear

    model = _base()
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_qlora(model, r=4, alpha=8, target_modules=["q_proj", "down_proj"], blocksize=64, double_quant=double_quant)
    half_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, NF4Linear):
            continue
        path = name.removesuffix(".base")
        w = orig[path].reshape(-1, 64)  # every test layer's size is a multiple of the block
        true_max = w.abs().amax(1, keepdim=True)
        stored = m.block_absmax().unsqueeze(1)
        bound = true_max * half_gap + (stored - true_max).abs() + rel_tol() * true_max  # + fp32 rounding
        assert ((m.dequantize().reshape(-1, 64) - w).abs() <= bound).all(), name
        n += 1
    assert n == 2 * 4  # qkv, proj, fc, proj per block; the LM head stays full precision
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_qlora_trains_only_the_adapters():
    from lmforge.adapt import apply_qlora

    model = _base().train()
    apply_qlora(model, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"])

    def digest():
        return {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                for k, v in model.state_dict().items()}

    before = digest()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    after = digest()
    changed = {k for k in before if before[k] != after[k]}
    assert changed and all(".lora_" in k for k in changed)
    assert any(k.endswith(".codes") for k in before)  # the frozen NF4 tensors were among those hashed
    assert trainable_parameters(model)["percent"] < 30


def test_bottleneck_adapters_start_as_the_base_train_alone_and_round_trip(tmp_path):
    from lmforge.adapt import BottleneckAdapter, apply_bottleneck_adapters

    model = _base()
    with torch.no_grad():
        base_out = model(IDS)
    apply_bottleneck_adapters(model, r=8)
    assert sum(isinstance(m, BottleneckAdapter) for m in model.modules()) == 2 * model.config.n_layer
    with torch.no_grad():
        assert torch.equal(model(IDS), base_out)  # W_up = 0: exactly the base at the start
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(".adapter_" not in k for k in frozen)
    with torch.no_grad():
        trained = model(IDS)
        with disable_adapters(model):
            assert torch.equal(model(IDS), base_out)
    assert (trained - base_out).abs().max().item() > 1e-4
    LLM(model).save(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m").model(IDS), trained)
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_adapters(model)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_train_alone_and_decode_with_the_cache_as_without(tmp_path, method):
    from lmforge.adapt import apply_prefix_tuning, apply_prompt_tuning

    model = _base()
    with torch.no_grad():
        base_out = model(IDS)
    (apply_prompt_tuning if method == "prompt" else apply_prefix_tuning)(model, n=5)
    with torch.no_grad():
        out = model(IDS)
        if method == "prompt":  # the same as prepending the embeddings to the input
            emb = torch.cat([model.virtual_tokens.prompt.expand(2, -1, -1), model.tok_emb(IDS)], 1)
            ids = torch.zeros(2, 17, dtype=torch.long)
            ref = model.lm_head(model.hidden_states(ids, inputs_embeds=emb))[:, 5:]
            assert_rel_close(out, ref, terms=256)
        cache = model.new_cache(2, max_len=14)
        model(IDS[:, :10], cache=cache)
        step = model(IDS[:, 10:11], cache=cache)[:, -1]
        assert_rel_close(step, model(IDS[:, :11])[:, -1], terms=256)
        with disable_adapters(model):
            assert torch.equal(model(IDS), base_out)
    assert (out - base_out).abs().max().item() > 1e-4
    rep = trainable_parameters(model)
    assert rep["adapter_layers"] == 1 and rep["trainable"] == sum(
        p.numel() for p in model.virtual_tokens.parameters())
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    model.eval()
    LLM(model).save(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m").model(IDS), out)


def test_adalora_moves_its_rank_budget_by_importance_and_round_trips(tmp_path):
    from lmforge.adapt import AdaLoRALinear, apply_adalora

    model = _base().train()
    apply_adalora(model, total_steps=20, r=4, target_r=2, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                  warmup=2, final=6, interval=2)
    ctl = model.adalora
    n_slices = 3 * model.config.n_layer
    assert [ctl.budget(s, n_slices) for s in (0, 2, 14, 20)] == [24, 24, 12, 12]
    assert 12 < ctl.budget(5, n_slices) < 24  # the cubic fall in between
    with torch.no_grad():
        model.eval()
        base_out = model(IDS)  # lambda = 0: the base
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids = torch.randint(0, 256, (2, 12), generator=g)
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    model(IDS)  # the forward after the last step applies the final budget
    ranks = ctl.ranks(model)
    assert int(ctl.step) == 21 and sum(ranks.values()) <= 12 and len(ranks) == n_slices
    assert all(0 <= r <= 4 for r in ranks.values())
    layers = [m for m in model.modules() if isinstance(m, AdaLoRALinear)]
    assert all(float(getattr(m, "ema_E_" + m.slices[0].name).abs().sum()) > 0 for m in layers)  # importance seen
    model.eval()
    with torch.no_grad():
        out = model(IDS)
        with disable_adapters(model):
            assert torch.equal(model(IDS), base_out)
    LLM(model).save(tmp_path / "m")
    back = load(tmp_path / "m").model
    with torch.no_grad():
        assert torch.equal(back(IDS), out)
    assert int(back.adalora.step) == 21 and back.adalora.ranks(back) == ranks
