"""Hugging Face folders both ways, per family: transformers' save_pretrained -> lmforge.load, and
llm.save -> transformers' from_pretrained, with the same logits (fp32, max-abs-diff <= 1e-4 of the logits'
max-abs); sharded checkpoints; tokenizer files with their chat template; and clear errors for bad folders."""

import json
import pickle

import pytest
import torch
import transformers
from safetensors.torch import save_file

import lmforge
from lmforge.errors import FormatError
from lmforge.llm import LLM
from lmforge.tokenizers import train_bpe

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
_HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    "llama": lambda: transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(vocab_size=300, hidden_size=48, intermediate_size=96,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=300, hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, tie_word_embeddings=True),
}
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. 1234567 " * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=300)


def _hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_HF_CONFIGS[family]()).eval()
    with torch.no_grad():  # transformers inits small; widen so that differences would show
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def _diff(ours, ref, vocab: int, T: int = 40) -> float:
    """max|ours - theirs| / max|theirs|: the logits' difference relative to their scale."""
    x = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits
        return ((ours(x) - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_folder_loads_with_same_logits(tmp_path, family, tokenizer):
    ref = _hf_model(family)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save(tmp_path)
    llm = lmforge.load(tmp_path)
    assert llm.config.family == family and llm.config.n_layer == 2
    assert _diff(llm.model, ref, 300) <= 1e-4
    assert llm.tokenizer.encode(TEXT[:100]) == tokenizer.encode(TEXT[:100])
    assert llm.tokenizer.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_in_transformers_with_same_logits(tmp_path, family, tokenizer, tiny_llm):
    model = tiny_llm(family, 1, vocab_size=tokenizer.vocab_size, train=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    llm = LLM(model, tokenizer)
    llm.save(tmp_path / "m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(ref).__name__.lower().startswith(family.replace("gpt2", "gpt2lm"))
    assert _diff(llm.model, ref, model.config.vocab_size) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    if family != "qwen2":  # transformers 5 imposes Qwen2's own pre-tokenizer on any qwen2 folder's tokenizer
        assert hf_tok.encode(TEXT[:100]) == tokenizer.encode(TEXT[:100])
    msgs = [{"role": "user", "content": "Hello"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(msgs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_checkpoint(tmp_path, family):
    ref = _hf_model(family)
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    llm = lmforge.load(tmp_path)
    assert llm.tokenizer is None
    assert _diff(llm.model, ref, 300) <= 1e-4


def test_bf16_folder_loads_as_stored_or_as_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_BF16_NATIVE", "1")  # as stored where bf16 is native (else fp32: test_precision)
    ref = _hf_model("llama")
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    _hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    assert {p.dtype for p in lmforge.load(tmp_path).model.parameters()} == {torch.bfloat16}
    llm = lmforge.load(tmp_path, dtype="float32")
    assert {p.dtype for p in llm.model.parameters()} == {torch.float32}
    assert _diff(llm.model, ref, 300) <= 1e-4


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture()
def folder(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path / "m", safe_serialization=True)
    return tmp_path / "m"


def test_unsupported_architecture_lists_supported(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gemma2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"config\.json.*'gemma2' is not supported.*gpt2, llama, mistral, qwen2"):
        lmforge.load(folder)


def test_config_with_missing_field(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"config\.json.*missing field 'num_hidden_layers'"):
        lmforge.load(folder)


def test_config_not_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(FormatError, match="not valid JSON"):
        lmforge.load(folder)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors(folder, keep):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated or corrupt"):
        lmforge.load(folder)


def test_tensor_of_wrong_shape(folder):
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(48, 95)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(FormatError, match=r"tensor 'blocks\.1\.mlp\.proj\.weight' has shape \(48, 95\).*\(48, 96\)"):
        lmforge.load(folder)


def test_missing_tensor_and_missing_shard(folder, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(FormatError, match="missing tensor 'model.norm.weight'"):
        lmforge.load(folder)
    ref = _hf_model("llama")
    ref.save_pretrained(tmp_path / "s", safe_serialization=True, max_shard_size="40KB")
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FormatError, match="missing weights file model-00002"):
        lmforge.load(tmp_path / "s")


def test_pickle_refused_unless_allowed(tmp_path):
    ref = _hf_model("llama")
    (tmp_path / "p").mkdir()
    ref.config.to_json_file(tmp_path / "p" / "config.json")
    torch.save(ref.state_dict(), tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"pytorch_model\.bin.*refusing to read a pickle.*allow_pickle"):
        lmforge.load(tmp_path / "p")
    llm = lmforge.load(tmp_path / "p", allow_pickle=True)
    assert _diff(llm.model, ref, 300) <= 1e-4


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_is_read_with_weights_only(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(transformers.LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64).to_dict()))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(FormatError, match="weights_only=True"):
        lmforge.load(tmp_path, allow_pickle=True)
    assert "pwned" not in capsys.readouterr().out
