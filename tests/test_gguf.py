"""GGUF import/export: our parser against gguf.GGUFReader, dequantization against gguf.quants and
transformers, exact F32 round trips, F16/BF16/Q8_0 within their rounding, the Q/K permutation against
transformers' GGUF loader, and clear errors for bad files."""

import struct

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_rel_close, rel_tol
from gguf import GGMLQuantizationType as Q
from helpers.tiny import tiny_llm

import lmforge
from lmforge.errors import ConfigError, FormatError
from lmforge.interop import gguf as gg
from lmforge.interop.gguf_file import GGUFFile, dequantize
from lmforge.interop.gguf_layout import permute, unpermute, unpermute_index
from lmforge.llm import LLM
from lmforge.tokenizers import train_bpe

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles. 12345 + 678 = 7023. ") * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=300)


def _llm(preset: str, tok=None, seed: int = 0, **overrides) -> LLM:
    if tok is not None:
        overrides.setdefault("vocab_size", tok.vocab_size)
    model = tiny_llm(preset, seed, train=True, **overrides)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a mix-up would show
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.1)
    return LLM(model, tok, preset)


FAMILIES = {
    "llama": dict(preset="tiny-llama"),
    "llama-tied-mqa": dict(preset="tiny-llama", **{"tie_embeddings": True, "attention.n_kv_head": 1}),
    "llama-headdim": dict(preset="tiny-llama", **{"attention.head_dim": 32}),
    "mistral": dict(preset="tiny-mistral"),
    "qwen2": dict(preset="tiny-qwen2"),
    "gpt2": dict(preset="tiny-gpt2"),
}


def _make(name, tok=None):
    kw = dict(FAMILIES[name])
    return _llm(kw.pop("preset"), tok, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_f32_round_trip_is_exact(tmp_path, name):
    ours = _make(name)
    path = gg.save_gguf(ours, tmp_path / "m.gguf", "f32")
    back = lmforge.load(path)
    a, b = ours.config.to_dict(), back.config.to_dict()
    assert {**a, "name": None} == {**b, "name": None}
    sa, sb = ours.model.state_dict(), back.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(ours.model(x), back.model(x))


@pytest.mark.parametrize("qtype,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16), ("q8_0", None)])
def test_lossy_exports_stay_within_rounding(tmp_path, qtype, dtype):
    ours = _make("llama")
    back = lmforge.load(gg.save_gguf(ours, tmp_path / "m.gguf", qtype), dequantize=True)
    sb = back.model.state_dict()
    for k, w in ours.model.state_dict().items():
        err = (w - sb[k]).abs()
        if w.dim() == 1:  # norms and biases stay F32
            assert torch.equal(w, sb[k]), k
        elif dtype is not None:  # rounding moves each weight by at most eps/2 of it (fp16: or half a subnormal step)
            f = torch.finfo(dtype)
            assert (err <= f.eps * w.abs() + f.smallest_normal * f.eps).all(), k
        else:  # Q8_0: steps of d = max|block|/127, so error <= d/2, plus 127 x d's fp16 rounding (2^-11), + fp32's
            bound = w.reshape(-1, 32).abs().amax(1, keepdim=True) * (0.5 / 127 + 2**-11 + rel_tol())
            assert (err.reshape(-1, 32) <= bound).all(), k
    x = torch.randint(0, ours.config.vocab_size, (1, 24))
    with torch.no_grad():
        assert_rel_close(back.model(x), ours.model(x), 0.05)


def test_header_and_tensors_match_gguf_reader(tmp_path, tokenizer):
    path = gg.save_gguf(_make("qwen2", tokenizer), tmp_path / "m.gguf", "q8_0")
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert meta.keys() == ours.metadata.keys()
    for k, v in meta.items():
        assert ours.metadata[k] == pytest.approx(v) if isinstance(v, float) else ours.metadata[k] == v, k
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type and info.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))
        assert np.array_equal(ours.tensor(t.name), gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_matches_gguf_quants_bit_for_bit(qtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 128)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    w[3] = 0.0  # an all-zero block: scale 0
    raw = gguf.quants.quantize(w, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(dequantize(raw, qtype, (16, 128)), ref)


# fp16 fields (byte offsets within a block) of the K-quants: set to sane values, the rest is random bytes
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(_K_SCALES))
def test_k_quants_match_transformers(qtype):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (8 * 2, size), dtype=np.uint8)  # 8 rows of 2 blocks
    for off in _K_SCALES[qtype]:
        raw[:, off:off + 2] = rng.uniform(0.001, 0.1, (16, 1)).astype(np.float16).view(np.uint8)
    ours = dequantize(raw.reshape(-1), qtype, (8, 2 * block))
    ref = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).reshape(8, 2 * block)
    assert_rel_close(ours, ref.numpy())


@pytest.mark.parametrize("name", ["llama", "llama-tied-mqa", "qwen2", "gpt2"])
def test_transformers_reads_our_export(tmp_path, name, tokenizer):
    """transformers' GGUF loader (which undoes llama.cpp's Q/K permutation itself) gets our logits."""
    ours = _make(name, tokenizer)
    if name == "gpt2":  # transformers reads gpt2.context_length as n_ctx and keeps n_positions at 1024
        ours = _llm("tiny-gpt2", tokenizer, block_size=1024)
    gg.save_gguf(ours, tmp_path / "m.gguf", "f32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert_rel_close(ours.model(x), ref(x).logits, 1e-4)  # the parity bar, of the logits' max-abs


def test_tokenizer_round_trip(tmp_path, tokenizer):
    ours = _make("llama", tokenizer)
    back = lmforge.load(gg.save_gguf(ours, tmp_path / "m.gguf", "f16"))
    tok = back.tokenizer
    for text in (TEXT[:200], "  spaces\tand\nnew lines 2024", "Ünïcödé 你好 😀", "<|im_start|>user\nhi<|im_end|>"):
        assert tok.encode(text) == tokenizer.encode(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == tokenizer.apply_chat_template(msgs)
    # a reader that only knows GGUF's own keys sees a byte-level BPE vocabulary
    meta = GGUFFile(tmp_path / "m.gguf").metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert "lmforge.tokenizer_json" not in meta


def test_tokenizer_smaller_than_the_model_is_padded(tmp_path, tokenizer):
    ours = _llm("tiny-llama", tokenizer, vocab_size=tokenizer.vocab_size + 20)
    meta = GGUFFile(gg.save_gguf(ours, tmp_path / "m.gguf", "f32")).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == ours.config.vocab_size  # llama.cpp needs one per row
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{ours.config.vocab_size - 1}]"
    back = lmforge.load(tmp_path / "m.gguf").tokenizer
    assert back.vocab_size == tokenizer.vocab_size and back.encode(TEXT) == tokenizer.encode(TEXT)


def test_unpermute_inverts_permute():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute(permute(w, 4), 4), w)
    assert torch.equal(w[torch.from_numpy(unpermute_index(64, 4))], unpermute(w, 4))


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return gg.save_gguf(_make("llama"), tmp_path_factory.mktemp("g") / "good.gguf", "q8_0")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, good_file, keep):
    data = good_file.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(FormatError, match=r"cut\.gguf.*truncated"):
        lmforge.load(bad)


def test_truncated_header(tmp_path, good_file):
    bad = tmp_path / "head.gguf"
    bad.write_bytes(good_file.read_bytes()[:100])
    with pytest.raises(FormatError, match=r"head\.gguf.*(truncated|corrupt)"):
        lmforge.load(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(FormatError, match=r"x\.gguf.*not a GGUF file"):
        lmforge.load(bad)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(FormatError, match="empty.gguf"):
        lmforge.load(tmp_path / "empty.gguf")


def _write(path, arch="llama", tensors=None, **meta):
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32 if isinstance(v, float) else w.add_string)(k, v)
    for name, (arr, raw_dtype) in (tensors or {}).items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_llama_meta(d=64):
    return {"llama.context_length": 64, "llama.embedding_length": d, "llama.block_count": 1,
            "llama.feed_forward_length": d, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}


def _tiny_llama_tensors(d=64, q=None):
    f = lambda *s: (np.random.rand(*s).astype(np.float32), None)  # noqa: E731
    t = {"token_embd.weight": f(32, d), "output_norm.weight": f(d), "blk.0.attn_norm.weight": f(d),
         "blk.0.ffn_norm.weight": f(d), "blk.0.attn_q.weight": f(d, d), "blk.0.attn_k.weight": f(d, d),
         "blk.0.attn_v.weight": f(d, d), "blk.0.attn_output.weight": f(d, d), "blk.0.ffn_gate.weight": f(d, d),
         "blk.0.ffn_up.weight": f(d, d), "blk.0.ffn_down.weight": f(d, d)}
    if q is not None:
        t["blk.0.attn_q.weight"] = q
    return t


def test_minimal_file_loads(tmp_path):
    llm = lmforge.load(_write(tmp_path / "ok.gguf", tensors=_tiny_llama_tensors(), **_tiny_llama_meta()))
    assert llm.config.n_layer == 1 and llm.tokenizer is None


def test_unsupported_architecture(tmp_path):
    path = _write(tmp_path / "bert.gguf", arch="bert", **{"bert.block_count": 1})
    with pytest.raises(FormatError, match=r"bert\.gguf.*architecture 'bert' is not supported.*llama, qwen2, gpt2"):
        lmforge.load(path)


def test_unsupported_quant_type(tmp_path):
    # IQ2_XXS packs 256 values into 66 bytes: a 256-wide model with one such matrix
    q = (np.zeros((256, 66), np.uint8), Q.IQ2_XXS)
    path = _write(tmp_path / "iq.gguf", tensors=_tiny_llama_tensors(256, q), **_tiny_llama_meta(256))
    with pytest.raises(FormatError, match=r"iq\.gguf.*IQ2_XXS.*supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        lmforge.load(path)


def test_wrong_shape_and_missing_tensor(tmp_path):
    q = (np.random.rand(32, 64).astype(np.float32), None)
    path = _write(tmp_path / "shape.gguf", tensors=_tiny_llama_tensors(q=q), **_tiny_llama_meta())
    with pytest.raises(FormatError, match=r"shape\.gguf.*blk\.0\.attn_q\.weight.*shape \(32, 64\).*\(64, 64\)"):
        lmforge.load(path)
    t = _tiny_llama_tensors()
    del t["blk.0.ffn_up.weight"]
    path = _write(tmp_path / "missing.gguf", tensors=t, **_tiny_llama_meta())
    with pytest.raises(FormatError, match=r"missing\.gguf.*missing tensor 'blk\.0\.ffn_up\.weight'"):
        lmforge.load(path)


def test_missing_metadata(tmp_path):
    meta = _tiny_llama_meta()
    del meta["llama.block_count"]
    path = _write(tmp_path / "meta.gguf", tensors=_tiny_llama_tensors(), **meta)
    with pytest.raises(FormatError, match=r"meta\.gguf.*llama\.block_count is missing"):
        lmforge.load(path)


def test_export_errors(tmp_path):
    llm = _make("llama")
    with pytest.raises(ConfigError, match=r"'q3_k'.*f32, f16, bf16, q8_0"):
        gg.save_gguf(llm, tmp_path / "m.gguf", "q3_k")
    with pytest.raises(ConfigError, match="family 'falcon' has no GGUF layout"):
        gg.save_gguf(_llm("tiny-falcon"), tmp_path / "f.gguf")
    with pytest.raises(ConfigError, match=r"\.gguf"):
        gg.save_gguf(llm, tmp_path / "m.bin")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_gguf_version_field_is_checked(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[4:8] = struct.pack("<I", 7)
    (tmp_path / "v.gguf").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="version 7"):
        lmforge.load(tmp_path / "v.gguf")


def test_convert_cli(tmp_path, capsys, monkeypatch):
    from lmforge.cli import main

    monkeypatch.setenv("LMFORGE_BF16_NATIVE", "1")  # bf16 loads as stored where native (else fp32: test_precision)

    assert main(["convert", "preset:tiny-qwen2", str(tmp_path / "q.gguf"), "--dtype", "f32"]) == 0
    assert "GGUF file (f32)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "q.gguf"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    back = lmforge.load(tmp_path / "hf")
    assert back.config.family == "qwen2" and next(back.model.parameters()).dtype == torch.bfloat16
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert_rel_close(back.model.float()(x), ref(x).logits, 1e-4)
    assert main(["convert", "preset:tiny-llama", str(tmp_path / "x"), "--to", "gguf"]) == 2
    assert main(["convert", "preset:tiny-llama", str(tmp_path / "y.gguf"), "--dtype", "q4_k"]) == 2
    err = capsys.readouterr().err
    assert "must end in .gguf" in err and "'q4_k' is not available for --to gguf" in err
