"""Bidirectional encoders (BERT, RoBERTa): parity with transformers from random weights, HF folder round
trips, heads, padding masks, and the errors an encoder gives for decoder-only requests."""

import json

import pytest
import torch
import transformers
from conftest import assert_rel_close
from safetensors.torch import load_file

import lmforge
from lmforge.errors import ConfigError, FormatError
from lmforge.interop import hf
from lmforge.llm import LLM
from lmforge.loading import build
from lmforge.models.heads import (
    SentenceEmbeddingHead,
    SequenceClassificationHead,
    TokenClassificationHead,
    pool,
)

ENCODERS = ["tiny-bert", "tiny-roberta"]


def _pair(name: str, head: str = "mlm", seed: int = 0):
    """Our model with random weights and transformers' model holding the same weights."""
    torch.manual_seed(seed)
    cfg = lmforge.get_preset(name).replace(head=head, pooler=head == "none")
    ours = build(cfg, None, name).eval()
    hcfg = transformers.AutoConfig.for_model(**hf.to_hf_config(cfg))
    cls = transformers.AutoModelForMaskedLM if head == "mlm" else transformers.AutoModel
    ref = cls.from_config(hcfg, attn_implementation="eager").eval()
    missing, unexpected = ref.load_state_dict(hf.to_hf_state_dict(cfg, ours.state_dict()), strict=False)
    assert not unexpected
    assert all("decoder" in k for k in missing), missing  # only the tied output weight/bias are implicit
    return cfg, ours, ref


def _inputs(cfg, B=3, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, cfg.pad_id)
    types = torch.zeros_like(ids)
    if cfg.embedding.type_vocab_size > 1:
        types[:, 5:] = 1
    return ids, mask, types


@pytest.mark.parametrize("name", ENCODERS)
def test_masked_lm_parity_with_transformers(name):
    cfg, ours, ref = _pair(name)
    ids, mask, types = _inputs(cfg)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types)
        b = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    real = mask.bool()
    assert a.shape == b.shape == (3, 13, cfg.vocab_size)
    assert_rel_close(a[real], b[real], 1e-4)  # the parity bar, of the logits' max-abs


@pytest.mark.parametrize("name", ENCODERS)
def test_bare_encoder_parity_and_pooler(name):
    cfg, ours, ref = _pair(name, head="none", seed=3)
    ids, mask, types = _inputs(cfg, seed=4)
    with torch.no_grad():
        h = ours(ids, attention_mask=mask, token_type_ids=types)  # head "none": hidden states
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        pooled = ours.pooler(h)
    assert h.shape == (3, 13, cfg.d_model)
    assert_rel_close(h[mask.bool()], out.last_hidden_state[mask.bool()], 1e-4)
    assert_rel_close(pooled, out.pooler_output, 1e-4)


def test_padding_does_not_change_real_tokens(tiny_llm):
    m = tiny_llm("bert")
    ids = torch.randint(5, 256, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 4])
    with torch.no_grad():
        a = m(ids)
        b = m(padded, attention_mask=mask)[:, :7]
        c = m(padded)[:, :7]  # without the mask, the padding is attended to
    assert_rel_close(b, a, terms=256)
    assert (a - c).abs().max().item() > 1e-3
    grads = []  # and training through the padded batch: the same gradients as without the padding
    for inputs, kw in ((ids, {}), (padded, {"attention_mask": mask})):
        m.zero_grad()
        out = m(inputs, **kw)[:, :7]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert_rel_close(grads[1], grads[0], terms=256)


def test_packing_for_many_rows_changes_only_rounding(tiny_llm):
    from lmforge.infer.packed import PackedLinear, pack_linears

    m = tiny_llm("bert")
    ids = torch.randint(5, 256, (3, 9))
    keys = list(m.state_dict())
    with torch.no_grad():
        plain = m(ids)
        pack_linears(m, many_rows=True)
        fc = m.blocks[0].mlp.fc
        assert isinstance(fc, PackedLinear) and list(m.state_dict()) == keys
        packed = m(ids)
        assert fc._kind == "onednn" and fc.fused(torch.randn(4, fc.in_features), "gelu") is not None
        assert_rel_close(packed, plain, terms=256)
        fc.weight.mul_(2)  # an in-place update must reach the packed copy
        changed = m(ids)
    fresh = build(lmforge.get_preset("tiny-bert"), None, "t").eval()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert_rel_close(changed, fresh(ids), terms=256)
    assert (changed - plain).abs().max().item() > 1e-3
    m(ids).sum().backward()  # with gradients it is a plain nn.Linear
    assert fc.weight.grad is not None
    with torch.no_grad():
        pack_linears(m)  # back to the decode layout: MKL for fp32, no fused activation
        m(ids)
        assert fc._kind == "fp32" and fc.fused(torch.randn(4, fc.in_features), "gelu") is None


def test_bidirectional_sees_the_future(tiny_llm):
    m = tiny_llm("bert")
    ids = torch.randint(5, 256, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 256
    with torch.no_grad():
        assert (m(ids)[0, 0] - m(changed)[0, 0]).abs().max().item() > 1e-4


@pytest.mark.parametrize("name", ENCODERS)
def test_hf_folder_round_trip_is_exact(name, tmp_path):
    cfg, ours, ref = _pair(name, seed=5)
    ref.save_pretrained(tmp_path / "hf")
    llm = lmforge.load(tmp_path / "hf")
    assert llm.config.family == cfg.family and llm.config.head == "mlm"
    llm.save(tmp_path / "ours")
    a = load_file(str(tmp_path / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(b) <= set(a)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    # what transformers leaves implicit (tied decoder weight/bias) is all that is missing
    assert all("decoder" in k or "position_ids" in k for k in set(a) - set(b))
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids, mask, types = _inputs(cfg)
    with torch.no_grad():
        x = back(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        y = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert torch.equal(x, y)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == cfg.family


def test_presets_shapes():
    mini = lmforge.get_preset("minilm-l6")
    assert (mini.n_layer, mini.d_model, mini.n_head, mini.mlp.hidden, mini.vocab_size, mini.block_size) == (
        6, 384, 12, 1536, 30522, 512)
    assert mini.embedding.type_vocab_size == 2 and mini.norm.placement == "post" and mini.mlp.activation == "gelu"
    bert = build(lmforge.get_preset("bert-base"), None, "b")
    assert 109e6 < bert.num_params() < 111e6  # BERT-base: 110M (MLM head included, tied)
    rob = lmforge.get_preset("roberta-base")
    assert rob.embedding.position_offset == 2 and rob.block_size == 514


def test_heads_shapes_and_pooling():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    m = pool(h, mask, "mean")
    assert_rel_close(m[0], h[0, :3].mean(0), terms=5)
    assert_rel_close(m[1], h[1].mean(0), terms=5)
    assert torch.equal(pool(h, mask, "cls"), h[:, 0])
    e = SentenceEmbeddingHead("mean", normalize=True)(h, mask)
    assert_rel_close(e.norm(dim=-1), torch.ones(2), terms=16)
    assert SequenceClassificationHead(16, 3)(h, mask).shape == (2, 3)
    assert TokenClassificationHead(16, 4)(h, mask).shape == (2, 5, 4)
    with pytest.raises(ValueError, match="mean"):
        pool(h, mask, "max")


def test_encoder_cannot_generate_and_decoder_cannot_embed():
    enc = LLM(build(lmforge.get_preset("tiny-bert"), None, "t"))
    with pytest.raises(ConfigError, match="embed"):
        enc.generate("hello")
    with pytest.raises(ConfigError, match="embed"):
        enc.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="encoder"):
        lmforge.load("preset:tiny-gpt2").embed(["hello"])


def test_over_long_input_and_bad_configs():
    m = build(lmforge.get_preset("tiny-roberta"), None, "t").eval()
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        m(torch.ones(1, 65, dtype=torch.long))  # 66 position rows, the first two unused
    with pytest.raises(FormatError, match="position_embedding_type"):
        hf.from_hf_config({"model_type": "bert", "position_embedding_type": "relative_key", "vocab_size": 10})
    with pytest.raises(ConfigError, match="head"):
        lmforge.get_preset("tiny-bert").replace(head="pool")
    bad = lmforge.get_preset("tiny-bert").replace(**{"norm.placement": "pre"})
    with pytest.raises(ConfigError, match="cannot export"):
        hf.to_hf_config(bad)


def test_gguf_export_of_an_encoder_is_a_clear_error(tmp_path):
    from lmforge.interop.gguf import save_gguf

    llm = LLM(build(lmforge.get_preset("tiny-bert"), None, "t"))
    with pytest.raises(ConfigError, match="family 'bert' has no GGUF layout"):
        save_gguf(llm, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_custom_attention_mask_replaces_the_causal_one(tiny_llm):
    m = tiny_llm("llama")
    x = torch.randint(0, 256, (2, 10))
    tril = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 1, 10, 10)
    with torch.no_grad():
        assert_rel_close(m(x, attn_mask=tril), m(x), terms=256)
        full = m(x, attn_mask=torch.ones(2, 1, 10, 10, dtype=torch.bool))
        assert (full[:, 0] - m(x)[:, 0]).abs().max().item() > 1e-4  # the first token now sees the others
    with pytest.raises(ValueError, match="without a cache"):
        m(x, attn_mask=tril, cache=m.new_cache(2))
