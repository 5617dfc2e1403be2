"""The logit lens: what each layer's residual stream already predicts, read through the model's own final norm
and LM head (nostalgebraist 2020, "interpreting GPT: the logit lens"; Belrose et al. 2023, "Eliciting Latent
Predictions from Transformers with the Tuned Lens", for its uses and limits).

Layer 0 reads the embeddings, layer l the residual after block l; the last is exactly the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.capture import encode_inputs, target_id, token_strings, trace, unwrap


@dataclass
class LogitLens:
    """The top-k next tokens read off every layer (0 = embeddings) at every position of one text."""

    tokens: list[str]  # the input tokens (row 0)
    top_ids: torch.Tensor  # (n_layer + 1, T, k) long
    top_tokens: list[list[list[str]]]  # [layer][position][k]
    top_probs: torch.Tensor  # (n_layer + 1, T, k)
    target_id: int | None
    target_rank: torch.Tensor | None  # (n_layer + 1, T) long, 0 = top

    def to_dict(self) -> dict:
        """JSON-ready: lists, floats and strings."""
        return {"tokens": self.tokens, "top_ids": self.top_ids.tolist(), "top_tokens": self.top_tokens,
                "top_probs": self.top_probs.tolist(), "target_id": self.target_id,
                "target_rank": None if self.target_rank is None else self.target_rank.tolist()}


def lens_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head(norm_f(hidden)) in fp32: the model's own final norm and head on any residual (.., C).

    For an encoder-decoder, the decoder's. A post-norm model (BERT) has no final norm: the head alone.
    """
    stack = model.decoder if getattr(model.config, "is_encoder_decoder", False) else model
    if getattr(stack, "lm_head", None) is None:
        raise ConfigError(f"{model.config.name!r} has no LM head (head: none): there are no logits to read a "
                          "layer through; the logit lens needs a language model")
    x = stack.norm_f(hidden) if stack.norm_f is not None else hidden
    return stack.head_logits(x).float()


def logit_lens(llm_or_model, text_or_ids, *, k: int = 5, target: str | int | None = None,
               tokenizer=None) -> LogitLens:
    """Top-k next tokens, their probabilities, and the target's rank, at every layer and position of one text.

    Args:
        llm_or_model: an `LLM` or a model.
        text_or_ids: a text (or token ids); for a list, its first. An encoder-decoder reads it as its source
            and is lensed on its decoder stack from the start token.
        k: how many top tokens per layer and position.
        target: a token (a text of one token, e.g. " Paris", or an id) whose rank to follow.
        tokenizer: overrides the LLM's own.
    """
    model, tok = unwrap(llm_or_model, tokenizer)
    ids, mask = encode_inputs(model, tok, text_or_ids)
    ids = ids[:1] if mask is None else ids[:1, mask[0].bool()]  # row 0, its padding left out
    vocab = model.config.vocab_size
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ConfigError(f"k must be 1..{vocab}, got {k!r}")
    tid = None if target is None else target_id(tok, target, vocab)
    lens_logits(model, torch.zeros(0, model.config.d_model, device=ids.device))  # no LM head: fail before the run
    t = trace(model, ids, capture=("residual",), tokenizer=tok)
    with torch.no_grad():
        # one layer at a time, shaped as the model's own pass: the last layer gives its logits bit for bit
        logits = torch.cat([lens_logits(model, h) for h in t.residual])  # (n_layer + 1, T, V)
    probs, top = logits.softmax(-1).topk(k, dim=-1)
    rank = None
    if tid is not None:
        rank = (logits > logits[..., tid:tid + 1]).sum(-1)
    shown = t.tokens[0] if t.decoder_input_ids is None else token_strings(tok, t.decoder_input_ids)[0]
    return LogitLens(tokens=shown, top_ids=top, top_tokens=[token_strings(tok, layer) for layer in top],
                     top_probs=probs, target_id=tid, target_rank=rank)
