"""teenyGPT's data and its report: fixed-length padded passages, and NLL/accuracy with and without padding.

The seed (Tomczak, "LLMs", teenygpt_example) trains on one-line passages: BOS + up to 149 characters,
right-padded with pad=0 to 150 tokens. Its loss is the SUM of the NLL over the 149 predicted positions
of a sequence, averaged over the batch (nats per sequence), with padding NOT masked, and its accuracy is
the per-sequence mean top-1 accuracy over all 149 positions. Most of those positions are pad -> pad,
which is trivially predictable, so both numbers flatter the model; lmforge trains and reports with
padding masked (targets read from a pad input do not count; the first pad, the end of the text, does)
and reports the unmasked numbers beside them for comparison with the seed's 88.82 nats and 0.822.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.train.batches import pad_sequences, padded_batches
from lmforge.train.objectives import CausalLM
from lmforge.train.trainer import evaluate


def passage_sequences(tokenizer, source: str = "shakespeare", split: str = "train", max_chars: int = 149,
                      length: int | None = None) -> torch.Tensor:
    """(N, length) padded sequences of `char_passages` (BOS + text, padded with the tokenizer's pad id)."""
    from lmforge.data import char_passages

    texts = char_passages(source, split, max_chars=max_chars)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return pad_sequences(tokenizer.encode_batch(texts), length or max_chars + 1, pad)


def sequence_report(model: nn.Module, seqs: torch.Tensor, pad_id: int, batch_size: int = 256,
                    dtype: str = "float32", device: str = "cpu") -> dict[str, float]:
    """NLL (nats per sequence and per token) and top-1 accuracy, with padding masked and unmasked.

    Masked: targets read from a pad input are left out (the first pad after the text counts: it is how
    the model ends a sequence). Unmasked: all T-1 positions, as the seed. Accuracies are over counted
    positions; unmasked every sequence has T-1 of them, so it equals the seed's mean per-sequence accuracy.
    """
    out: dict[str, float] = {"sequences": float(len(seqs))}
    for tag, masked in (("masked", True), ("unmasked", False)):
        m = evaluate(model, CausalLM("sequence_sum", mask_padding=masked),
                     padded_batches(seqs, batch_size, pad_id), dtype, device)
        out.update({f"nll_per_seq_{tag}": m["nll_per_sequence"], f"nll_per_token_{tag}": m["nll_per_token"],
                    f"acc_{tag}": m["acc"], f"ppl_{tag}": m["ppl"]})
    return out
