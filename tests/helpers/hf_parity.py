"""Shared check for causal-LM families with a `transformers` counterpart: the HF folder loads into lmforge with
the same logits (fp32, max-abs-diff ≤ 1e-4 of the logits' max-abs) and the same greedy 32-token continuation,
and our saved folder loads back in `transformers` with the same logits."""

import torch
import transformers
from conftest import assert_rel_close

import lmforge
from lmforge.infer.generate import GenerationConfig, generate_ids
from lmforge.llm import LLM


def assert_hf_round_trip(ref, vocab_size: int, tmp_path) -> torch.nn.Module:
    """Check `ref` (a random-weight HF causal LM) against lmforge both ways; return lmforge's model."""
    ref.save_pretrained(tmp_path / "hf")
    ours = lmforge.load(tmp_path / "hf").model.eval()
    x = torch.randint(0, vocab_size, (2, 40))
    prompt = torch.randint(0, vocab_size, (1, 12))
    with torch.no_grad():
        theirs = ref(x).logits
        assert_rel_close(ours(x), theirs, 1e-4)
        want = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[0, 12:].tolist()
    assert generate_ids(ours, [prompt[0].tolist()], GenerationConfig(max_new_tokens=32, temperature=0))[0] == want
    LLM(ours, None, "t").save(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert_rel_close(back(x).logits, theirs, 1e-4)
    return ours
