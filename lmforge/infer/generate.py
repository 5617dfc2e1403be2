"""Autoregressive generation: one engine for greedy and sampled decoding, batches and streaming,
beam search and speculative decoding.

The model runs once over the (left-padded) prompts to fill a preallocated KV cache, then once per
new token with a single position per row. Sampling happens on fp32 logits of the last position only.
`iter_tokens` and `generate_ids` are the entry points; with `gen.num_beams > 1` they run beam search
(`beam.py`), with a draft model or `gen.prompt_lookup` speculative decoding (`speculative.py`), both
over the same static KV cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.errors import ConfigError
from lmforge.infer.beam import Hypothesis, beam_search
from lmforge.infer.compiled import compiled_decode
from lmforge.infer.packed import blas_decode, blas_decode_for, pack_linears
from lmforge.infer.sampling import GenerationConfig, filter_logits, make_generator, prepare_prompts, sample_next
from lmforge.infer.speculative import SpecStats, speculative_tokens
from lmforge.models import DecoderLM

__all__ = ["GenerationConfig", "Hypothesis", "SpecStats", "TextStream", "beam_search", "filter_logits",
           "generate_ids", "iter_tokens", "prepare_prompts", "sample_next", "speculative_tokens"]


def is_speculative(gen: GenerationConfig, draft: DecoderLM | None) -> bool:
    """Whether these settings decode speculatively (a draft model, or prompt lookup)."""
    if draft is not None and gen.compile:
        raise ConfigError("compile applies to plain greedy or sampled decoding, not to speculative decoding; "
                          "drop compile=True or the draft model")
    return draft is not None or gen.prompt_lookup > 0


@torch.inference_mode()
def iter_tokens(model: DecoderLM, prompts: list[list[int]], gen: GenerationConfig,
                eos_ids: Sequence[int] = (), pad_id: int = 0, draft: DecoderLM | None = None,
                stats: SpecStats | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) LongTensor, until max_new_tokens or the context is full.

    Rows that produced an EOS keep yielding `pad_id`. The caller decides about stop strings and may
    simply stop iterating. Speculative decoding (`draft`, or `gen.prompt_lookup`) takes one prompt and
    fills `stats`; beam search has no token-by-token form (see `beam_search`).
    """
    gen.validate()
    if gen.num_beams > 1:
        raise ConfigError("beam search picks its tokens only at the end, so it cannot stream; "
                          "call generate without stream (or beam_search)")
    if is_speculative(gen, draft):
        if len(prompts) != 1:
            raise ConfigError("speculative decoding streams one prompt at a time; give one prompt")
        for chunk in speculative_tokens(model, prompts[0], gen, eos_ids, draft, stats):
            for t in chunk:
                yield torch.tensor([t])
        return
    cfg = model.config
    device = model.tok_emb.weight.device
    pack_linears(model)  # CPU: multiply from prepacked weights (no-op elsewhere and when done before)
    ids, mask = prepare_prompts(prompts, cfg.block_size, gen, pad_id)
    B, T = ids.shape
    steps = min(gen.max_new_tokens, cfg.block_size - T)
    if steps <= 0:
        return
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    generator = make_generator(gen, device)
    seen = None
    if gen.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for i in range(B):
            seen[i, ids[i] if mask is None else ids[i][mask[i].bool()]] = True
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device) if gen.stop_at_eos else None
    done = torch.zeros(B, dtype=torch.bool, device=device)

    use_blas = blas_decode_for(model, B)
    cache = model.new_cache(B, max_len=T + steps)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]  # (B, V)
    compiled = compiled_decode(model) if gen.compile else None  # after an eager call: packed tables exist
    for step in range(steps):
        nxt = sample_next(logits, gen, generator, seen)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        yield nxt
        if eos is not None and eos.numel():
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                return
        if step + 1 < steps:
            if compiled is not None:
                logits = compiled(model, nxt[:, None], cache)
                continue
            with blas_decode(use_blas):
                logits = model(nxt[:, None], cache=cache, logits_to_keep=1)[:, -1]


def generate_ids(model: DecoderLM, prompts: list[list[int]], gen: GenerationConfig,
                 eos_ids: Sequence[int] = (), pad_id: int = 0, draft: DecoderLM | None = None,
                 stats: SpecStats | None = None) -> list[list[int]]:
    """New tokens for every prompt (EOS included when it ended the row, padding excluded).

    With beam search, the best hypothesis of each prompt (`beam_search` gives the n best and scores);
    speculative decoding runs the prompts one after another.
    """
    gen.validate()
    if gen.num_beams > 1:
        if draft is not None:
            raise ConfigError("beam search and speculative decoding cannot be combined; choose one")
        return [hyps[0].tokens for hyps in beam_search(model, prompts, gen, eos_ids, pad_id)]
    if is_speculative(gen, draft):
        return [sum(speculative_tokens(model, p, gen, eos_ids, draft, stats), []) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    eos = set(eos_ids) if gen.stop_at_eos else set()
    for nxt in iter_tokens(model, prompts, gen, eos_ids, pad_id):
        for i, t in enumerate(nxt.tolist()):
            if not finished[i]:
                out[i].append(t)
                finished[i] = t in eos
    return out


class TextStream:
    """Turns a growing list of token ids into text pieces, decoding only a short window per token.

    Decoding all ids again for every new token costs O(n) per token (O(n^2) per reply). Instead, as in
    vLLM's incremental detokenizer, each token decodes a window that starts at the previous piece's first
    token: the new text is what `decode(ids[prefix:])` adds to `decode(ids[prefix:read])`. The window's
    first token gives the context that tokenizers which strip or merge at a word start need. While the window
    ends in an incomplete UTF-8 sequence (byte-level or byte-fallback tokens that split a character decode
    to U+FFFD) the window is not moved on, so it grows until the character is whole; the text before that
    character is shown at once. Text that might be the start of a stop string is held back; stop strings
    are searched in the newly added tail only.
    """

    def __init__(self, decode, stop: Sequence[str]):
        self.decode, self.stop = decode, list(stop)
        self.ids: list[int] = []
        self.emitted = 0  # characters of `text` already handed out
        self.text = ""  # the text of ids[:read] (cut at a stop string once one appeared)
        self.stopped = False
        self._prefix = 0  # ids[prefix:read] decode to the end of `text`: context for the next window
        self._read = 0  # ids taken into `text` so far
        self._longest_stop = max((len(x) for x in self.stop), default=0)

    def _new_text(self) -> str:
        """What the tokens after `read` add to the text (ending in U+FFFD while a character is incomplete)."""
        prev = self.decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        cur = self.decode(self.ids[self._prefix:])
        return cur[len(prev):] if len(cur) > len(prev) else ""

    def _commit(self, new: str) -> None:
        self.text += new
        self._prefix, self._read = self._read, len(self.ids)

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        self.ids.append(token)
        if self.stopped:
            return ""
        new = self._new_text()
        whole = not new.endswith("\ufffd")  # else an incomplete character: wait for its next bytes
        ready = self.text + (new if whole else new.rstrip("\ufffd"))
        # a stop string can only newly appear where it overlaps the added text
        lo = max(0, len(self.text) - self._longest_stop + 1)
        cut = min((i for x in self.stop if (i := ready.find(x, lo)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = ready[:cut], True
            return self.flush()
        if new and whole:
            self._commit(new)  # else the window grows until the character is whole
        safe = len(ready)  # the whole characters may be shown already
        for x in self.stop:  # hold back a suffix that could grow into a stop string
            for k in range(min(len(x) - 1, len(ready)), 0, -1):
                if x.startswith(ready[-k:]):
                    safe = min(safe, len(ready) - k)
                    break
        piece = ready[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        """Everything not yet shown (an incomplete character at the end decodes to U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):
            self._commit(self._new_text())
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
