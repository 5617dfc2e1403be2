"""Speculative decoding: a cheap drafter proposes a few tokens, the model checks them all in one pass.

Lossless by construction (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023): the model runs once over the last token and k drafted tokens, which gives
its distribution p_i after each of them. Greedy keeps the drafts up to the first one that differs from
the model's arg-max, then adds the model's own choice. Sampling accepts draft x_i, drawn from the
drafter's distribution q_i, with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection it
draws from normalize(max(0, p_i - q_i)), and when all are accepted it draws one more token from p_k.
Every token then follows the model's own distribution, so the output is what the model alone would
give, k + 1 tokens per pass at best.

Drafters: `PromptLookup` copies what followed an earlier occurrence of the context's last n-gram (no
model; pays off when the output repeats its input, e.g. rewriting or quoting a passage), and
`DraftModel` runs a smaller model of the same tokenizer with its own KV cache. Rejected tokens leave
both caches by `Cache.rollback`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.infer.packed import blas_decode, blas_decode_for, pack_linears
from lmforge.infer.sampling import GenerationConfig, filter_logits, make_generator, prepare_prompts
from lmforge.models import DecoderLM


@dataclass
class SpecStats:
    """Counts of one speculative run: verify passes, drafted tokens, accepted drafts, tokens produced."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookup:
    """Proposes the tokens that followed the most recent earlier occurrence of the context's last n
    tokens, trying n = max_ngram down to 1 (prompt-lookup decoding, Saxena 2023). Needs no model; its
    proposals are certain (q is one-hot), so sampling accepts a draft with the model's probability of it."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            tail = context[L - n:]
            last = tail[-1]
            for end in range(L - 2, n - 2, -1):  # `end`: where an earlier occurrence would end
                if context[end] == last and context[end - n + 1:end + 1] == tail:
                    return context[end + 1:end + 1 + k], None
        return [], None

    def commit(self, kept: int) -> None:
        """Nothing to undo: the lookup keeps no state."""


class DraftModel:
    """A smaller model of the same tokenizer that drafts autoregressively from its own KV cache.

    Its cache always holds a prefix of the context; before drafting it reads the context tokens it has
    not seen (one, or two after all drafts were accepted), and `commit` rolls back what was rejected.
    """

    def __init__(self, model: DecoderLM, gen: GenerationConfig, generator: torch.Generator | None,
                 max_len: int, vocab_size: int):
        if max_len > model.config.block_size:
            raise ConfigError(f"the draft model's context ({model.config.block_size} tokens) is shorter than "
                              f"prompt + new tokens ({max_len}); use fewer new tokens or another draft")
        self.model, self.gen, self.generator, self.vocab = model, gen, generator, vocab_size
        pack_linears(model)
        self.cache = model.new_cache(1, max_len=max_len)
        self.device = model.tok_emb.weight.device
        self.blas = blas_decode_for(model)
        self.base = 0  # context length at the last proposal

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        x = torch.tensor([tokens], dtype=torch.long, device=self.device)
        with blas_decode(self.blas and len(tokens) == 1):
            logits = self.model(x, cache=self.cache, logits_to_keep=1)[:, -1].float()  # (1, V_draft)
        V = self.vocab  # the target's vocabulary decides; a padded draft table is cut, a short one extended
        if logits.shape[-1] > V:
            logits = logits[:, :V]
        elif logits.shape[-1] < V:
            logits = torch.nn.functional.pad(logits, (0, V - logits.shape[-1]), value=float("-inf"))
        return logits

    def propose(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        self.base = len(context)
        if k == 0:
            return [], None
        feed = context[self.cache.length:]
        drafts, qs = [], []
        for _ in range(k):
            logits = self._logits(feed)
            if self.gen.temperature == 0:
                d = int(logits.argmax(-1))
            else:
                q = filter_logits(logits, self.gen).softmax(-1)[0]
                d = int(torch.multinomial(q, 1, generator=self.generator))
                qs.append(q)
            drafts.append(d)
            feed = [d]
        return drafts, (torch.stack(qs) if qs else None)

    def commit(self, kept: int) -> None:
        """`kept` drafts were accepted: keep context + those in the cache, no more."""
        extra = self.cache.length - (self.base + kept)
        if extra > 0:
            self.cache.rollback(extra)


def _verify(p_logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, gen: GenerationConfig,
            generator: torch.Generator | None) -> tuple[int, int]:
    """(number of drafts accepted, the token that follows them) from the model's logits (n + 1, V)."""
    if gen.temperature == 0:
        pred = p_logits.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == pred[n]:
            n += 1
        return n, pred[n]
    p = filter_logits(p_logits, gen).softmax(-1)  # (n + 1, V)
    for i, d in enumerate(drafts):
        qd = float(q[i, d]) if q is not None else 1.0
        if float(torch.rand((), generator=generator)) * qd < float(p[i, d]):  # u < p/q, without dividing
            continue
        if q is not None:
            residual = (p[i] - q[i]).clamp_(min=0)
        else:  # q one-hot at d: max(0, p - q) is p without d
            residual = p[i].clone()
            residual[d] = 0
        if float(residual.sum()) <= 0:  # p == q up to rounding: no mass left to correct with
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


@torch.inference_mode()
def speculative_tokens(model: DecoderLM, prompt: list[int], gen: GenerationConfig, eos_ids: Sequence[int] = (),
                       draft: DecoderLM | None = None, stats: SpecStats | None = None) -> Iterator[list[int]]:
    """Yield the new tokens of one prompt in the chunks each verify pass produces (an EOS ends the last).

    The drafter is `draft` when given, else prompt lookup of n-grams up to `gen.prompt_lookup` tokens.
    """
    gen.validate()
    if gen.repetition_penalty != 1.0:
        raise ConfigError("repetition_penalty is not supported with speculative decoding; leave it at 1")
    if draft is None and not gen.prompt_lookup:
        raise ConfigError("speculative decoding needs a drafter: a draft model or prompt_lookup > 0")
    stats = stats if stats is not None else SpecStats()
    cfg = model.config
    device = model.tok_emb.weight.device
    pack_linears(model)
    ids, _ = prepare_prompts([prompt], cfg.block_size, gen, 0)
    context = ids[0].tolist()
    T = len(context)
    steps = min(gen.max_new_tokens, cfg.block_size - T)
    if steps <= 0:
        return
    generator = make_generator(gen, device)
    eos = set(eos_ids) if gen.stop_at_eos else set()
    cache = model.new_cache(1, max_len=T + steps)
    for m in (model, draft):
        if m is not None and not all(hasattr(s, "k") for s in m.new_cache(1, max_len=1).layers):
            raise ConfigError(f"speculative decoding needs models whose layers are all attention: {m.config.name} "
                              "has recurrent layers, whose state cannot forget rejected tokens")
    drafter = (DraftModel(draft, gen, generator, T + steps, cfg.vocab_size) if draft is not None
               else PromptLookup(gen.prompt_lookup))
    # OpenBLAS multiplies a few rows (a verify pass) slower than MKL on two threads: 2-11 rows of SmolLM2
    # fp32 took 88-108 ms through it against 40-84 ms without it, so only a single-row pass uses it
    blas = blas_decode_for(model)
    if T > 1:  # every cache holds the context but its last token, which the next pass reads first
        model(ids[:, :-1].to(device), cache=cache, logits_to_keep=1)
    produced = 0
    while produced < steps:
        k = min(gen.draft_tokens, steps - produced - 1)  # the pass adds one token of its own
        drafts, q = drafter.propose(context, k)
        x = torch.tensor([context[-1:] + drafts], dtype=torch.long, device=device)
        with blas_decode(blas and x.shape[1] == 1):
            logits = model(x, cache=cache)[0]  # (1 + len(drafts), V)
        n, nxt = _verify(logits, drafts, q, gen, generator)
        cache.rollback(len(drafts) - n)
        drafter.commit(n)
        new = drafts[:n] + [nxt]
        stats.passes += 1
        stats.drafted += len(drafts)
        stats.accepted += n
        hit = next((i for i, t in enumerate(new) if t in eos), None)
        if hit is not None:
            new = new[:hit + 1]
        stats.tokens += len(new)
        produced += len(new)
        context += new
        yield new
        if hit is not None:
            return
