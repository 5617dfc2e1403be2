"""LoRA / DoRA module swaps: parity with peft, adapter files both ways, merge/un-merge, toggling, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

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
from lmforge.config import get_preset
from lmforge.errors import ConfigError, FormatError
from lmforge.llm import LLM, load
from lmforge.models import DecoderLM

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
TARGETS = {"tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "tiny-gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]}


def _base(preset="tiny-llama", seed=0):
    torch.manual_seed(seed)
    return DecoderLM(get_preset(preset)).eval()


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
    assert (ours - theirs).abs().max().item() <= 1e-5
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
    assert (ours - theirs).abs().max().item() <= 1e-5
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
    assert (merged - adapted).abs().max().item() < 1e-4
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
        assert (hf(IDS).logits - model(IDS)).abs().max().item() <= 1e-5


def test_bad_input_is_named(tmp_path):
    model = _base()
    with pytest.raises(ConfigError, match=r"match no layer.*q_proj"):
        apply_lora(model, target_modules=["q_prj"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was changed
    apply_lora(model, r=4, target_modules=["q_proj"])
    save_adapter(model, tmp_path / "a")
    other = DecoderLM(get_preset("tiny-llama").replace(d_model=96)).eval()
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
    gpt = DecoderLM(get_preset("tiny-gpt2")).eval()
    with pytest.raises(FormatError, match="does not have"):
        load_adapter(gpt, meta_free)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (meta_free / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(FormatError, match="peft_type"):
        load_adapter(other, meta_free)
