"""Encoder-decoders (T5, the original Transformer) on the one model's blocks: presets, parity with transformers'
T5ForConditionalGeneration (random weights from a config, no download), HF folders both ways, the cached decode
against the full recompute, generation through the one generator."""

import json

import pytest
import torch
import transformers
from conftest import assert_rel_close

import lmforge
from lmforge.errors import ConfigError
from lmforge.infer.beam import beam_search
from lmforge.infer.generate import GenerationConfig, generate_ids
from lmforge.interop import hf_t5
from lmforge.models import EncoderDecoderLM, make_model
from lmforge.presets import get_preset


def _hf_t5(ff: str, tied: bool, seed: int = 0, std: float = 0.3):
    torch.manual_seed(seed)
    hc = transformers.T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3,
                               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                               dropout_rate=0.0, feed_forward_proj=ff, tie_word_embeddings=tied, pad_token_id=0,
                               eos_token_id=1, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(hc).eval()
    # T5's own init (embeddings N(0, 1), tied head) makes a random model repeat one token; wider weights make
    # greedy and beam outputs vary, so that comparing them tests something
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _ours(ref) -> EncoderDecoderLM:
    cfg = hf_t5.from_hf_config(ref.config.to_dict())
    model = make_model(cfg, init_weights=False)
    model.load_state_dict(hf_t5.from_hf_state_dict(cfg, ref.state_dict()))
    model.tie_weights()
    return model.eval()


def _source():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, 300, (3, 40), generator=g)
    mask = torch.ones_like(x)
    mask[1, :12] = 0  # left padding, as the generator pads
    mask[2, :31] = 0
    return x.masked_fill(mask == 0, 0), mask


def test_presets_match_their_sources():
    sizes = {}
    for name in ("t5-small", "t5-v1.1-small", "transformer-base"):
        with torch.device("meta"):
            sizes[name] = make_model(get_preset(name), init_weights=False).num_params()
    assert sizes["t5-small"] == 60_506_624  # transformers' t5-small, counted the same way
    assert 76e6 < sizes["t5-v1.1-small"] < 78e6  # "77M" (google/t5-v1_1-small)
    # Vaswani et al. 2017, "Attention Is All You Need", Table 3: 65M (their vocabulary count differs)
    assert 60e6 < sizes["transformer-base"] < 66e6
    t5 = get_preset("t5-small")
    assert (t5.position.kind, t5.norm.kind, t5.attention.scale) == ("relative", "rmsnorm", 1.0)
    assert t5.mlp.activation == "relu" and not t5.mlp.bias and not t5.norm.bias
    base = get_preset("transformer-base")
    assert (base.position.kind, base.norm.placement, base.embedding.scale) == ("sinusoidal", "post", True)
    for name in ("tiny-t5", "tiny-transformer-base"):
        m = make_model(get_preset(name))
        assert m.encoder.tok_emb is m.decoder.tok_emb is m.tok_emb
        assert m.decoder.lm_head.weight is m.tok_emb.weight  # shared source, target and output embeddings


@pytest.mark.parametrize("ff,tied,std", [("relu", True, 0.3), ("gated-gelu", False, 0.15)])
def test_t5_parity_with_transformers(ff, tied, std):
    ref = _hf_t5(ff, tied, std=std)
    ours = _ours(ref)
    x, mask = _source()
    y = torch.randint(2, 300, (3, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        r = ref(input_ids=x, attention_mask=mask, decoder_input_ids=y)
        enc = ours.encode(x, mask)
        logits = ours(x, attention_mask=mask, decoder_input_ids=y)
    real = mask.bool()
    assert_rel_close(enc[real], r.encoder_last_hidden_state[real], 1e-4)  # the parity bar, of the max-abs
    assert_rel_close(logits, r.logits, 1e-4)
    # greedy decoding of 16 tokens: transformers' generate against the one generator on the bound decoder
    with torch.no_grad():
        want = ref.generate(input_ids=x, attention_mask=mask, max_new_tokens=16, do_sample=False, num_beams=1,
                            use_cache=False)  # its cache assumes as many decoder as encoder layers
        got = generate_ids(ours.bind(ours.encode(x, mask), mask), [[0]] * 3,
                           GenerationConfig(max_new_tokens=16, temperature=0.0), eos_ids=[1], pad_id=0)
    for row, toks in zip(want.tolist(), got):
        row = row[1:]  # transformers' output starts with the decoder start token
        if 1 in row:
            row = row[:row.index(1) + 1]
        assert row == toks
    assert len({t for row in got for t in row}) >= 10  # varied output, not one repeated token
    # beam search (the one beam search on the same bound decoder): same beams and scores
    with torch.no_grad():
        want = ref.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False,
                            use_cache=False, num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
        got = beam_search(ours.bind(ours.encode(x, mask), mask), [[0]] * 3,
                          GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2), eos_ids=[1])
    hyps = [h for row in got for h in row]
    for row, score, h in zip(want.sequences.tolist(), want.sequences_scores.tolist(), hyps):
        assert [t for t in row[1:] if t != 0] == [t for t in h.tokens if t != 0]
        assert_rel_close(h.score, score, 1e-4)  # the logits' parity bar, of the score's size


def test_hf_folder_round_trip_and_load(tmp_path):
    ref = _hf_t5("relu", True, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    llm = lmforge.load(tmp_path / "hf")
    assert isinstance(llm.model, EncoderDecoderLM) and llm.config.family == "t5"
    x, mask = _source()
    y = torch.randint(2, 300, (3, 9))
    with torch.no_grad():
        assert_rel_close(llm.model(x, attention_mask=mask, decoder_input_ids=y),
                         ref(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits, 1e-4)
    llm.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "t5"
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k  # exact, both ways
    again = lmforge.load(tmp_path / "ours").model.state_dict()
    for k, v in llm.model.state_dict().items():
        assert torch.equal(v, again[k]), k


@pytest.mark.parametrize("preset", ["tiny-t5", "tiny-transformer-base"])
def test_cached_decode_equals_full_recompute(preset, tmp_path, tiny_llm):
    model = tiny_llm(preset)
    x, mask = _source()
    x = x % 256
    y = torch.randint(2, 256, (3, 12))
    with torch.no_grad():
        full = model(x, attention_mask=mask, decoder_input_ids=y)  # (B, T, V), no cache
        memory = model.encode(x, mask)
        cache = model.new_cache(3, max_len=16)
        steps = [model(decoder_input_ids=y[:, :5], memory=memory, attention_mask=mask, cache=cache)]
        assert cache.layers[0].cross is not None  # cross K/V computed once, at the first decoder call
        kept = cache.layers[0].cross[0]
        for t in range(5, 12):  # later steps read the cross K/V from the cache: no memory passed
            steps.append(model.decoder(y[:, t:t + 1], cache=cache))
        assert cache.layers[0].cross[0] is kept
    assert_rel_close(torch.cat(steps, 1), full, terms=256)
    llm = lmforge.LLM(model)
    llm.save(tmp_path / "m")  # an lmforge-layout folder (no transformers layout for this preset)
    again = lmforge.load(tmp_path / "m").model
    with torch.no_grad():
        assert torch.equal(again(x, attention_mask=mask, decoder_input_ids=y), full)


def test_bad_input_is_named():
    model = make_model(get_preset("tiny-t5"))
    with pytest.raises(ConfigError, match="decoder_input_ids"):
        model(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ConfigError, match="encoder's output"):
        model.decoder(torch.tensor([[0]]))
    with pytest.raises(ConfigError, match="parallel_residual"):
        get_preset("tiny-t5").replace(parallel_residual=True)
    with pytest.raises(ConfigError, match="cannot export"):
        hf_t5.to_hf_config(get_preset("tiny-transformer-base"))


def test_post_ln_encoder_decoder_matches_marian():
    # The 2017 Transformer's block (post-LN, sinusoidal positions, sqrt(d)-scaled shared embeddings, ReLU) is
    # what transformers' MarianMT computes; its sinusoid table puts all sines before all cosines where the
    # paper interleaves them, so the test hands Marian's table to our model.
    hc = transformers.MarianConfig(vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                   decoder_ffn_dim=128, activation_function="relu", max_position_embeddings=128,
                                   dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True,
                                   pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    ref = transformers.MarianMTModel(hc).eval()
    hf = {k.removeprefix("model."): v for k, v in ref.state_dict().items()}
    sd = {"tok_emb.weight": hf["shared.weight"]}
    for stack in ("encoder", "decoder"):
        for i in range(2):
            p, h = f"{stack}.blocks.{i}.", f"{stack}.layers.{i}."
            names = [("attn.proj", "self_attn.out_proj"), ("norm_1", "self_attn_layer_norm"), ("mlp.fc", "fc1"),
                     ("mlp.proj", "fc2"), ("norm_2", "final_layer_norm")]
            if stack == "decoder":
                names += [("cross_attn.q", "encoder_attn.q_proj"), ("cross_attn.proj", "encoder_attn.out_proj"),
                          ("norm_cross", "encoder_attn_layer_norm")]
            for ours, theirs in names:
                for w in ("weight", "bias"):
                    sd[f"{p}{ours}.{w}"] = hf[f"{h}{theirs}.{w}"]
            for w in ("weight", "bias"):
                sd[f"{p}attn.qkv.{w}"] = torch.cat([hf[f"{h}self_attn.{x}_proj.{w}"] for x in "qkv"])
                if stack == "decoder":
                    sd[f"{p}cross_attn.kv.{w}"] = torch.cat([hf[f"{h}encoder_attn.{x}_proj.{w}"] for x in "kv"])
    sd["decoder.lm_head.weight"] = sd["tok_emb.weight"]
    model = make_model(get_preset("tiny-transformer-base").replace(**{"norm.eps": 1e-5}), init_weights=False)
    model.load_state_dict(sd)
    model.tie_weights()
    model.encoder.sin_pos.copy_(hf["encoder.embed_positions.weight"])
    model.decoder.sin_pos.copy_(hf["decoder.embed_positions.weight"])
    x = torch.randint(2, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[1, 21:] = 0  # right padding: Marian counts positions from the row's start
    y = torch.randint(2, 256, (2, 11))
    with torch.no_grad():
        r = ref(input_ids=x, attention_mask=mask, decoder_input_ids=y)
        enc = model.eval().encode(x, mask)
        logits = model(x, attention_mask=mask, decoder_input_ids=y)
    assert_rel_close(enc[mask.bool()], r.encoder_last_hidden_state[mask.bool()], 1e-4)
    assert_rel_close(logits, r.logits, 1e-4)
