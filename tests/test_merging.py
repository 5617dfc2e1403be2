"""Model merging: worked examples on hand-built tensors, bad input, and merged models that load and generate."""

import pytest
import torch
from conftest import assert_rel_close

from lmforge.cli import main
from lmforge.compress.merging import dare, elect_and_merge, merge_models, merge_state_dicts, merge_tensors, trim
from lmforge.errors import ConfigError
from lmforge.llm import LLM, load
from lmforge.models import DecoderLM
from lmforge.presets import get_preset

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
# task vectors t1, t2, t3 and the fine-tunes they make
T1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
T2 = torch.tensor([-1.0, -1.0, 2.0, 4.0])
T3 = torch.tensor([2.0, 0.1, -4.0, 1.0])
M = [BASE + T1, BASE + T2, BASE + T3]


def test_average_and_task_arithmetic():
    assert torch.allclose(merge_tensors(None, M, "average"), BASE + (T1 + T2 + T3) / 3)
    assert torch.allclose(merge_tensors(None, M[:2], "average", weights=[0.75, 0.25]),
                          torch.tensor([1.5, -0.75, 3.75, 2.375]))
    # base + 0.5 * (t1 + t2 + t3) = 1 + 0.5 * [2, -2.9, 1, 5.5]
    assert torch.allclose(merge_tensors(BASE, M, "task_arithmetic", scale=0.5), torch.tensor([2.0, -0.45, 1.5, 3.75]))


def test_ties_worked_example():
    # trim to the top 50% magnitudes: t1 -> [0, -2, 3, 0], t2 -> [0, 0, 2, 4], t3 -> [2, 0, -4, 0]
    assert trim(T1, 0.5).tolist() == [0.0, -2.0, 3.0, 0.0]
    assert trim(T3, 0.5).tolist() == [2.0, 0.0, -4.0, 0.0]
    # elected signs of the sum [2, -2, 1, 4]: + - + +; disjoint means: [2, -2, (3 + 2) / 2, 4]
    merged = elect_and_merge([trim(t, 0.5) for t in (T1, T2, T3)], [1.0, 1.0, 1.0])
    assert merged.tolist() == [2.0, -2.0, 2.5, 4.0]
    assert merge_tensors(BASE, M, "ties", density=0.5, scale=1.0).tolist() == [3.0, -1.0, 3.5, 5.0]
    # an entry where every trimmed vector is 0 stays at the base
    assert elect_and_merge([torch.tensor([0.0, 1.0]), torch.tensor([0.0, -3.0])], [1, 1]).tolist() == [0.0, -3.0]


def test_dare_drops_and_rescales():
    t = torch.arange(1.0, 10001.0)
    out = dare(t, 0.25, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.allclose(out[kept], t[kept] / 0.75)  # kept entries rescaled by 1 / (1 - p)
    assert abs(kept.float().mean().item() - 0.75) < 0.02  # about 1 - p of them kept
    assert torch.equal(dare(t, 0.0, torch.Generator()), t)
    # the same drop mask the generator gives, applied by hand
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(4, generator=torch.Generator().manual_seed(3)) >= 0.5
    assert torch.equal(dare(T1, 0.5, g), torch.where(mask, T1 * 2, torch.zeros(4)))
    # density 1 DARE is task arithmetic; dare_ties with density 1 is TIES without trimming
    assert torch.allclose(merge_tensors(BASE, M, "dare", density=1.0), merge_tensors(BASE, M, "task_arithmetic"))
    assert torch.allclose(merge_tensors(BASE, M, "dare_ties", density=1.0), merge_tensors(BASE, M, "ties"))


def test_state_dicts_bad_input():
    a = {"w": torch.ones(2, 2), "step": torch.tensor(3)}
    b = {"w": torch.zeros(2, 2), "step": torch.tensor(3)}
    out = merge_state_dicts(a, [a, b], "task_arithmetic")
    assert out["w"].tolist() == [[0.0, 0.0], [0.0, 0.0]] and out["step"].item() == 3
    with pytest.raises(ConfigError, match="tensor 'w' is \\(3, 2\\) in model 1"):
        merge_state_dicts(a, [a, {"w": torch.zeros(3, 2), "step": torch.tensor(3)}], "ties")
    with pytest.raises(ConfigError, match="missing \\['step'\\]"):
        merge_state_dicts(None, [a, {"w": torch.zeros(2, 2)}], "average")
    with pytest.raises(ConfigError, match="needs the base"):
        merge_state_dicts(None, [a, b], "ties")
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_state_dicts(a, [a, b], "soup")
    with pytest.raises(ConfigError, match="density"):
        merge_state_dicts(a, [a, b], "ties", density=0.0)


def _finetune(base: DecoderLM, seed: int) -> DecoderLM:
    """A stand-in fine-tune: the base plus a small seeded perturbation (same architecture and keys)."""
    m = DecoderLM(base.config)
    m.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def test_merged_models_load_and_generate(tmp_path, tiny_llm):
    from lmforge.tokenizers import CharTokenizer

    tok = CharTokenizer()
    base = tiny_llm("llama", vocab_size=tok.vocab_size, train=True)
    LLM(base, tok).save(tmp_path / "base")
    for i in (1, 2):
        LLM(_finetune(base, i), tok).save(tmp_path / f"ft{i}")
    rc = main(["merge", str(tmp_path / "ft1"), str(tmp_path / "ft2"), "--base", str(tmp_path / "base"),
               "--method", "ties", "--density", "0.5", "--out", str(tmp_path / "merged")])
    assert rc == 0
    merged = load(tmp_path / "merged")
    text = merged.generate("to be or", max_new_tokens=8, temperature=0)
    assert isinstance(text, str) and len(text) > 0
    # the same merge through Python, from the loaded folders, gives the same weights
    again = merge_models([tmp_path / "ft1", tmp_path / "ft2"], base=tmp_path / "base", method="ties", density=0.5)
    for (k, v), w in zip(merged.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(v, w), k
    # and the merged weights are neither fine-tune nor the base
    k = "blocks.0.attn.proj.weight"
    w = merged.model.state_dict()[k]
    for name in ("base", "ft1", "ft2"):
        assert not torch.equal(w, load(tmp_path / name).model.state_dict()[k]), name


def test_cli_merge_refuses_different_architectures(tmp_path, capsys):
    torch.manual_seed(0)
    LLM(DecoderLM(get_preset("tiny-llama"))).save(tmp_path / "a")
    LLM(DecoderLM(get_preset("tiny-llama").replace(n_layer=3))).save(tmp_path / "b")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "average",
                 "--out", str(tmp_path / "m")]) == 2
    assert "different config" in capsys.readouterr().err


def test_lora_fine_tunes_merge_as_whole_weights(tiny_llm):
    """A LoRA fine-tune enters a merge with its adapters folded in (the plain model's keys)."""
    from lmforge.adapt import apply_lora
    from lmforge.compress.merging import _plain_state
    from lmforge.loading import build

    base = tiny_llm("llama")
    ft = DecoderLM(base.config).eval()
    ft.load_state_dict(base.state_dict())
    apply_lora(ft, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    sd = _plain_state(LLM(ft))
    assert set(sd) == set(base.state_dict())
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert_rel_close(build(base.config, sd, "t").eval()(x), ft(x), terms=256)
        # task arithmetic of the LoRA fine-tune alone, scale 1, gives the fine-tune back
        merged = merge_models([LLM(ft)], base=LLM(base), method="task_arithmetic")
        assert_rel_close(merged.model(x), ft(x), terms=256)
