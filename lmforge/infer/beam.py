"""Beam search over the static KV cache, with length penalty, early stopping and n-best output.

Each prompt keeps `num_beams` running hypotheses, one cache row each. A step scores every continuation
of every beam by its summed log-probability, keeps the best 2 x num_beams candidates (more when there
are several EOS tokens, so that enough of them do not end), moves finished candidates among the top
num_beams into the prompt's list of finished hypotheses, and continues with the best num_beams that did
not finish; the cache rows are then reordered so that each beam continues its parent's cache.

A finished hypothesis scores sum(log p) / len ** length_penalty, its length counting the new tokens (an
EOS included). `early_stopping` decides when a prompt is done, as in `transformers` (whose results this
reproduces; see tests/test_beam.py): True, as soon as num_beams hypotheses have finished; False, once
the best running beam, at its current length, cannot beat the worst finished one; "never", the same
with the longest possible length when length_penalty > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.infer.packed import blas_decode, blas_decode_for, pack_linears
from lmforge.infer.sampling import GenerationConfig, prepare_prompts
from lmforge.models import DecoderLM

_NEG = -1.0e9  # "impossible" score; finite so that sums and comparisons stay well defined


@dataclass
class Hypothesis:
    """One finished beam: its new tokens (EOS included when it ended the beam) and its score."""

    tokens: list[int]
    score: float


@torch.inference_mode()
def beam_search(model: DecoderLM, prompts: list[list[int]], gen: GenerationConfig,
                eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[Hypothesis]]:
    """The `gen.num_return_sequences` best hypotheses of every prompt, best first."""
    gen.validate()
    cfg, nb = model.config, gen.num_beams
    device = model.tok_emb.weight.device
    pack_linears(model)
    ids, mask = prepare_prompts(prompts, cfg.block_size, gen, pad_id)
    B, T = ids.shape
    steps = min(gen.max_new_tokens, cfg.block_size - T)
    if steps <= 0:
        return [[Hypothesis([], 0.0)] * gen.num_return_sequences for _ in prompts]
    eos = torch.tensor(sorted(set(eos_ids)) if gen.stop_at_eos else [], dtype=torch.long, device=device)
    K = min(max(2, 1 + eos.numel()) * nb, nb * cfg.vocab_size)  # candidates kept per step
    lp, early = gen.length_penalty, gen.early_stopping

    cache = model.new_cache(B, max_len=T + steps)
    logits = model(ids.to(device), attention_mask=None if mask is None else mask.to(device), cache=cache,
                   logits_to_keep=1)[:, -1]
    cache = cache.repeat_rows(nb)  # one prefill per prompt, shared by its beams
    logits = logits.repeat_interleave(nb, 0)  # (B * nb, V)

    run_tokens = torch.full((B, nb, steps), pad_id, dtype=torch.long, device=device)
    run_scores = torch.full((B, nb), _NEG, device=device)
    run_scores[:, 0] = 0.0  # all beams start equal: only the first may expand, or they would stay copies
    fin_tokens = run_tokens.clone()
    fin_len = torch.zeros((B, nb), dtype=torch.long, device=device)
    fin_scores = torch.full((B, nb), _NEG, device=device)
    fin_done = torch.zeros((B, nb), dtype=torch.bool, device=device)
    open_ = torch.ones((B, 1), dtype=torch.bool, device=device)  # may a prompt still improve its finished list
    top_nb = torch.arange(K, device=device) < nb
    use_blas = blas_decode_for(model, B * nb)

    for step in range(steps):
        V = logits.shape[-1]
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, nb, V) + run_scores[:, :, None]
        cand_scores, flat = torch.topk(logp.view(B, nb * V), K)  # (B, K), best first
        parent, tok = flat // V, flat % V
        cand_tokens = run_tokens.gather(1, parent[:, :, None].expand(B, K, steps)).clone()  # (B, K, steps)
        cand_tokens[:, :, step] = tok
        ends = torch.isin(tok, eos) | (step + 1 == steps)  # (B, K): EOS, or no room for another token

        # finished candidates among the top num_beams join the finished list if they are among its best
        new_fin = ends & top_nb
        score = cand_scores / float(step + 1) ** lp
        blocked = ~open_ | (fin_done.all(1, keepdim=True) & (early is True)) | ~new_fin
        score = score + blocked.float() * _NEG
        all_scores = torch.cat([fin_scores, score], 1)
        keep = torch.topk(all_scores, nb).indices  # (B, nb)
        fin_scores = all_scores.gather(1, keep)
        fin_tokens = torch.cat([fin_tokens, cand_tokens], 1).gather(1, keep[:, :, None].expand(B, nb, steps))
        fin_len = torch.cat([fin_len, torch.full_like(tok, step + 1)], 1).gather(1, keep)
        fin_done = torch.cat([fin_done, new_fin], 1).gather(1, keep)

        # the best num_beams candidates that did not end go on
        live = cand_scores + ends.float() * _NEG
        pick = torch.topk(live, nb).indices  # (B, nb)
        run_scores = live.gather(1, pick)
        run_tokens = cand_tokens.gather(1, pick[:, :, None].expand(B, nb, steps))
        rows = (parent.gather(1, pick) + torch.arange(B, device=device)[:, None] * nb).view(-1)

        # can a running beam still beat the worst finished one?
        best_len = steps if early == "never" and lp > 0 else step + 1
        best_possible = run_scores[:, :1] / float(best_len) ** lp
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, _NEG))
        open_ = open_ & (best_possible > worst).any(1, keepdim=True)
        if not bool(open_.any()) or (early is True and bool(fin_done.all())) or bool(ends.all()):
            break
        cache.reorder(rows)
        with blas_decode(use_blas):
            logits = model(run_tokens[:, :, step].reshape(-1, 1), cache=cache, logits_to_keep=1)[:, -1]

    out = []
    for b in range(B):
        hyps = [Hypothesis(fin_tokens[b, j, :int(fin_len[b, j])].tolist(), float(fin_scores[b, j]))
                for j in range(gen.num_return_sequences)]
        out.append(hyps)
    return out
