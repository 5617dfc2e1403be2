"""Capture a model's insides for one call, and intervene in them: the base of every `lmforge.inspect` analysis.

`trace(model, ids)` runs the model once and returns a `Trace`: the attention probabilities of every attention
layer, the residual stream after the embeddings and after each block, and each block's token-mixer and
channel-mixer outputs. `Interventions` change that same call: heads masked (their output zeroed before the
output projection), a site's activation zeroed or replaced by one from another input (activation patching,
Vig et al. 2020, "Investigating Gender Bias in Language Models Using Causal Mediation Analysis"; Meng et al.
2022, "Locating and Editing Factual Associations in GPT"), steering vectors added to the residual stream
(Turner et al. 2023, "Activation Addition: Steering Language Models Without Optimization").

Nothing stays behind: the model's own forward is untouched when not tracing (each attention layer tests one
attribute, `probe`, that is None), the fused SDPA path computes every output, and the probabilities are
written out (`attention_probs`: q k^T, the same mask, softmax in fp32) only in a traced call that asks for them.
Forward hooks and probes are removed in a `finally`, whatever happens.

This module sits one floor below `lmforge.llm` (tests/test_layout.py), so that `LLM.inspect` can call it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.mixers.attention import Attention, attention_probs

SITES = ("attention", "residual", "mixer_out", "mlp_out")
PATCH_SITES = ("mixer_out", "mlp_out", "residual")


@dataclass
class Trace:
    """What one traced call captured; lists are empty for what `capture` did not ask for.

    For an encoder-decoder, `residual`, `attention`, `mixer_out` and `mlp_out` are the decoder stack's, the
    encoder's are in `encoder_residual` / `encoder_attention`, and `cross_attention` holds the decoder's
    attention over the encoder output (B, n_head, T, S). `logits` is the model's own output, as float32: the
    final hidden states (B, T, C) for a model without an LM head (a sentence encoder).
    """

    input_ids: torch.Tensor  # (B, T) long (the source, for an encoder-decoder)
    tokens: list[list[str]]  # one decoded string per id ("" without a tokenizer)
    logits: torch.Tensor  # (B, T, V) float32
    residual: list[torch.Tensor]  # n_layer + 1 of (B, T, C): the embedding output, then after each block
    attention: list[torch.Tensor | None]  # per layer (B, n_head, T, L) fp32, None where the mixer is not attention
    mixer_out: list[torch.Tensor]  # per layer (B, T, C): the token mixer's output, before the residual add
    mlp_out: list[torch.Tensor | None]  # per layer (B, T, C): the channel mixer's output, None without one
    encoder_residual: list[torch.Tensor] | None = None
    encoder_attention: list[torch.Tensor | None] | None = None
    cross_attention: list[torch.Tensor | None] | None = None
    attention_mask: torch.Tensor | None = None  # (B, T) long, 1 at real tokens; None when no row is padded
    decoder_input_ids: torch.Tensor | None = None  # (B, T) an encoder-decoder's decoder input
    n_layer: int = 0
    mixers: list[str] = field(default_factory=list)  # the (decoder) stack's token mixer per layer ("attention", ...)

    def to_dict(self, row: int = 0) -> dict:
        """JSON-ready data of one row: tokens, ids, attention probabilities [layer][head][T][L] (None where the
        layer is not attention) and the residual stream's L2 norm [layer][position]."""
        def maps(stack):
            return [None if a is None else a[row].tolist() for a in stack or []]

        return {"tokens": self.tokens[row], "input_ids": self.input_ids[row].tolist(), "n_layer": self.n_layer,
                "mixers": self.mixers,
                "attention": maps(self.attention), "encoder_attention": maps(self.encoder_attention),
                "cross_attention": maps(self.cross_attention),
                "residual_norm": [r[row].float().norm(dim=-1).tolist() for r in self.residual]}


@dataclass
class Interventions:
    """Changes made to a traced call (every field optional). Layers are the (decoder) stack's block indices.

    head_mask: layer -> heads whose output is zeroed before the output projection (head ablation).
    zero: (site, layer) pairs whose output is zeroed; site "mixer_out" or "mlp_out".
    patch: (site, layer) -> activation put in that place, e.g. another input's `Trace` entry (activation
        patching): broadcastable to (B, T, C). Site "mixer_out" / "mlp_out" (layer 0..n_layer - 1) or
        "residual", indexed as `Trace.residual`: 0 is the embedding output, i the output of block i - 1.
    steer: layer -> vector (C,) added to the residual stream after that block.
    """

    head_mask: dict[int, list[int]] | None = None
    zero: list[tuple[str, int]] | None = None
    patch: dict[tuple[str, int], torch.Tensor] | None = None
    steer: dict[int, torch.Tensor] | None = None

    def check(self, stack: nn.Module) -> None:
        """Raise `ConfigError` for a layer, head or site that `stack` (a `DecoderLM`) does not have."""
        n, d = len(stack.blocks), stack.config.d_model
        for layer, heads in (self.head_mask or {}).items():
            mixer = stack.blocks[check_layer(layer, n)].token_mixer
            if not isinstance(mixer, Attention):
                raise ConfigError(f"layer {layer}'s token mixer is {type(mixer).__name__}, not attention: it has no "
                                  "heads to mask")
            for h in heads:
                check_index(h, mixer.n_head, "head")
        for (site, layer), sites in [(z, PATCH_SITES[:2]) for z in self.zero or []] + \
                [(p, PATCH_SITES) for p in self.patch or {}]:
            if site not in sites:
                raise ConfigError(f"unknown site {site!r}; valid: {', '.join(sites)}")
            check_index(layer, n + 1 if site == "residual" else n, "layer")
            if site == "mlp_out" and stack.blocks[layer].channel_mixer is None:
                raise ConfigError(f"layer {layer} has no channel mixer (block {stack.config.layer_mixers()[layer]})")
        for layer, vec in (self.steer or {}).items():
            check_layer(layer, n)
            if vec.shape[-1] != d or vec.dim() != 1:
                raise ConfigError(f"steering vector for layer {layer} has shape {tuple(vec.shape)}; expected ({d},)")


def check_index(i: int, n: int, what: str) -> int:
    """`i` if 0 <= i < n, else a one-line `ConfigError` naming the range."""
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
        raise ConfigError(f"{what} {i!r} is out of range: this model has {n} ({what} 0..{n - 1})")
    return i


def check_layer(layer: int, n: int) -> int:
    """A block index 0..n-1 (negative counts from the end, as in Python), or a one-line `ConfigError`."""
    if isinstance(layer, int) and not isinstance(layer, bool) and -n <= layer < 0:
        layer += n
    return check_index(layer, n, "layer")


class _Probe:
    """The callable an `Attention` (or `CrossAttention`) holds as `probe` during a trace.

    Records the layer's probabilities into `record[index]` and multiplies its per-head output (B, nh, T, hs)
    by `keep` ((nh,) or (B, nh): 1 keeps a head, 0 ablates it), before the heads are joined and projected.
    """

    def __init__(self, record: list | None, index: int, keep: torch.Tensor | None, grad: bool):
        self.record, self.index, self.keep, self.grad = record, index, keep, grad

    def __call__(self, module: nn.Module, q, k, mask, causal: bool, y: torch.Tensor) -> torch.Tensor:
        if self.record is not None:
            p = attention_probs(q, k, mask, causal, module.scale)
            self.record[self.index] = p if self.grad else p.detach()
        if self.keep is not None:
            keep = self.keep.to(y.dtype)
            y = y * (keep.view(1, -1, 1, 1) if keep.dim() == 1 else keep.view(*keep.shape, 1, 1))
        return y


class _Session:
    """Every hook and probe one trace installs, so that `close` takes all of them away again."""

    def __init__(self, grad: bool):
        self.grad, self.handles, self.probed, self.flags = grad, [], [], []

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.grad else x.detach()

    def probe(self, module: nn.Module, probe: _Probe) -> None:
        module.probe = probe  # an instance attribute over the class's None, deleted in close()
        self.probed.append(module)

    def flag(self, stack: nn.Module, name: str, value) -> None:
        self.flags.append((stack, name, stack.__dict__.get(name, _MISSING)))
        setattr(stack, name, value)

    def hook(self, module: nn.Module, fn, pre: bool = False) -> None:
        reg = module.register_forward_pre_hook if pre else module.register_forward_hook
        self.handles.append(reg(fn))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.probed:
            m.__dict__.pop("probe", None)
        for stack, name, old in reversed(self.flags):
            if old is _MISSING:
                stack.__dict__.pop(name, None)
            else:
                setattr(stack, name, old)


_MISSING = object()


def _replace(x: torch.Tensor, site: str, layer: int, iv: Interventions) -> torch.Tensor:
    """x with the interventions at (site, layer) applied: zeroed, or replaced by the patch (broadcast)."""
    if iv.zero and (site, layer) in iv.zero:
        x = torch.zeros_like(x)
    if iv.patch and (site, layer) in iv.patch:
        p = iv.patch[(site, layer)].to(device=x.device, dtype=x.dtype)
        try:
            x = torch.broadcast_to(p, x.shape)
        except RuntimeError:
            raise ConfigError(f"patch for ({site!r}, {layer}) has shape {tuple(p.shape)}; the activation there is "
                              f"{tuple(x.shape)}") from None
    return x


def _install_stack(s: _Session, stack: nn.Module, rec: dict, capture: set, iv: Interventions,
                   keep: dict[int, torch.Tensor] | None = None) -> None:
    """Hooks and probes on the blocks of one `DecoderLM` stack, filling `rec`'s lists."""
    blocks = stack.blocks
    s.flag(stack, "pack_padding", False)  # padded encoders: dense (B, T) activations, as transformers computes
    s.flag(stack, "activation_checkpointing", False)  # a recomputed block would fire its hooks twice

    def store(name: str, i: int, x: torch.Tensor) -> None:
        if name in capture:
            rec[name][i] = s.keep(x)

    def embed_hook(module, args):
        x = _replace(args[0], "residual", 0, iv)
        store("residual", 0, x)
        return (x, *args[1:])

    s.hook(blocks[0], embed_hook, pre=True)
    for i, block in enumerate(blocks):
        def block_hook(module, args, out, i=i):
            out = _replace(out, "residual", i + 1, iv)
            if iv.steer and i in iv.steer:
                out = out + iv.steer[i].to(device=out.device, dtype=out.dtype)
            store("residual", i + 1, out)
            return out

        def mixer_hook(module, args, out, i=i, site="mixer_out"):
            out = _replace(out, site, i, iv)
            store(site, i, out)
            return out

        s.hook(block, block_hook)
        s.hook(block.token_mixer, mixer_hook)
        if block.channel_mixer is not None:
            s.hook(block.channel_mixer, lambda m, a, o, i=i: mixer_hook(m, a, o, i, "mlp_out"))
        heads = keep.get(i) if keep else None
        if isinstance(block.token_mixer, Attention) and ("attention" in capture or heads is not None):
            s.probe(block.token_mixer, _Probe(rec["attention"] if "attention" in capture else None, i, heads, s.grad))
        if block.cross_attn is not None and "attention" in capture:
            s.probe(block.cross_attn, _Probe(rec["cross_attention"], i, None, s.grad))


def _keep_masks(stack: nn.Module, head_mask: dict[int, list[int]] | None) -> dict[int, torch.Tensor]:
    """layer -> (nh,) float: 0 at the heads to ablate, 1 elsewhere."""
    out = {}
    for layer, heads in (head_mask or {}).items():
        mixer = stack.blocks[check_layer(layer, len(stack.blocks))].token_mixer
        k = torch.ones(mixer.n_head, device=next(stack.parameters()).device)
        k[list(heads)] = 0.0
        out[check_layer(layer, len(stack.blocks))] = k
    return out


def _check_capture(capture: Sequence[str] | str) -> set[str]:
    capture = {capture} if isinstance(capture, str) else set(capture)
    bad = sorted(capture - set(SITES))
    if bad:
        raise ConfigError(f"unknown capture {bad[0]!r}; valid: {', '.join(SITES)}")
    return capture


def _is_encoder_decoder(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "encoder")


def layer_stack(model: nn.Module) -> nn.Module:
    """The stack of blocks that `trace`'s layers index: the model, or an encoder-decoder's decoder."""
    stack = model.decoder if _is_encoder_decoder(model) else model
    if not hasattr(stack, "blocks"):
        raise ConfigError(f"{type(model).__name__} has no blocks to inspect (an n-gram model has no layers)")
    return stack


def _record(n: int) -> dict[str, list]:
    return {"residual": [None] * (n + 1), "attention": [None] * n, "mixer_out": [None] * n, "mlp_out": [None] * n,
            "cross_attention": [None] * n}


def _check_ids(model: nn.Module, ids: torch.Tensor | Sequence[int], what: str = "input_ids") -> torch.Tensor:
    """ids as a (B, T) long tensor on the model's device, checked against the vocabulary."""
    ids = torch.as_tensor(ids)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ConfigError(f"{what} must be token ids of shape (T,) or (B, T), got {tuple(ids.shape)} {ids.dtype}")
    if ids.shape[1] == 0:
        raise ConfigError(f"empty {what}: there is nothing to inspect; give some text")
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ConfigError(f"{what} holds ids outside the vocabulary (0..{vocab - 1})")
    return ids.long().to(next(model.parameters()).device)


@contextmanager
def capturing(model: nn.Module, capture: Sequence[str] = (), interventions: Interventions | None = None, *,
              grad: bool = False, head_weights: dict[int, torch.Tensor] | None = None) -> Iterator[dict]:
    """Hooks and probes on `model` for the calls made inside the `with`, all removed on leaving it.

    Yields the record: {"residual", "attention", "mixer_out", "mlp_out", "cross_attention"} lists of the
    (decoder) stack, filled by each call (a later call overwrites), and "encoder" (the same for the encoder
    stack of an encoder-decoder, residual and attention only). `trace` is one call of this; head ablation
    uses it around `model(ids, targets=...)`. Arguments as `trace`'s.
    """
    caps = _check_capture(capture)
    encdec, stack = _is_encoder_decoder(model), layer_stack(model)
    iv = interventions or Interventions()
    iv.check(stack)
    keep = _keep_masks(stack, iv.head_mask)
    for layer, w in (head_weights or {}).items():
        layer = check_layer(layer, len(stack.blocks))
        if not isinstance(stack.blocks[layer].token_mixer, Attention):
            raise ConfigError(f"layer {layer}'s token mixer is not attention: it has no heads to weigh")
        w = w.to(next(model.parameters()).device, torch.float32)
        keep[layer] = w * keep[layer] if layer in keep else w
    rec = _record(len(stack.blocks))
    s = _Session(grad)
    try:
        _install_stack(s, stack, rec, caps, iv, keep)
        if encdec:
            rec["encoder"] = _record(len(model.encoder.blocks))
            _install_stack(s, model.encoder, rec["encoder"], caps & {"attention", "residual"}, Interventions())
        yield rec
    finally:
        s.close()


def trace(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
          capture: Sequence[str] = SITES, interventions: Interventions | None = None, grad: bool = False,
          tokenizer=None, decoder_input_ids: torch.Tensor | None = None,
          head_weights: dict[int, torch.Tensor] | None = None) -> Trace:
    """Run `model` once on `input_ids` and capture what `capture` names, with `interventions` applied.

    Args:
        model: a `DecoderLM` (decoder or bidirectional encoder) or an `EncoderDecoderLM`.
        input_ids: (B, T) or (T,) token ids (an encoder-decoder's source).
        attention_mask: (B, T), 1 at real tokens (left padding for a decoder, as generation pads).
        capture: any of "attention", "residual", "mixer_out", "mlp_out".
        interventions: heads masked, sites zeroed or patched, steering vectors (`Interventions`).
        grad: keep the autograd graph (captured tensors are not detached); off: run under no_grad.
        tokenizer: decodes `Trace.tokens` (one decode per id).
        decoder_input_ids: an encoder-decoder's decoder input (default: its start token alone).
        head_weights: layer -> (n_head,) or (B, n_head) multipliers of each head's output before the output
            projection (0 ablates a head, per row for a (B, n_head) tensor: many ablations in one batch).
    """
    caps = _check_capture(capture)
    layer_stack(model)
    ids = _check_ids(model, input_ids)
    encdec = _is_encoder_decoder(model)
    mask = None if attention_mask is None else attention_mask.to(ids.device)
    dec = None
    if encdec:
        start = next((i for i in (model.config.decoder_start_id, model.config.pad_id) if i is not None), 0)
        dec = torch.full((ids.shape[0], 1), start) if decoder_input_ids is None else decoder_input_ids
        dec = _check_ids(model, dec, "decoder_input_ids")
    with capturing(model, caps, interventions, grad=grad, head_weights=head_weights) as rec, \
            torch.set_grad_enabled(grad):
        out = model(ids, attention_mask=mask, decoder_input_ids=dec) if encdec else model(ids, attention_mask=mask)

    def got(name: str, r: dict | None) -> list | None:
        return None if r is None else r[name] if name in caps else []

    enc, stack = rec.get("encoder"), layer_stack(model)
    cross = None if not encdec else rec["cross_attention"] if "attention" in caps else []
    return Trace(input_ids=ids, tokens=token_strings(tokenizer, ids), logits=out.float(),
                 residual=got("residual", rec), attention=got("attention", rec), mixer_out=got("mixer_out", rec),
                 mlp_out=got("mlp_out", rec), encoder_residual=got("residual", enc),
                 encoder_attention=got("attention", enc), cross_attention=cross,
                 attention_mask=None if mask is None else mask.long(), decoder_input_ids=dec,
                 n_layer=len(stack.blocks), mixers=[t for t, _ in stack.config.layer_mixers()])


# ---- inputs: texts or ids, targets, token strings ----------------------------------------------------------

def unwrap(llm_or_model, tokenizer=None) -> tuple[nn.Module, object]:
    """(model, tokenizer) of an `LLM` or a bare model; `tokenizer` overrides the LLM's own."""
    model = getattr(llm_or_model, "model", llm_or_model)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"expected an LLM or an lmforge model, got {type(llm_or_model).__name__}")
    return model, tokenizer if tokenizer is not None else getattr(llm_or_model, "tokenizer", None)


def encode_inputs(model: nn.Module, tokenizer, text_or_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (B, T), attention_mask (B, T) or None) of a text, a list of texts, or ids ((T,), (B, T), list).

    Texts are encoded with the tokenizer's special tokens (a BOS, BERT's [CLS]/[SEP]) and padded: on the left
    for a decoder (as generation pads), on the right for an encoder or an encoder-decoder's source.
    """
    layer_stack(model)
    if isinstance(text_or_ids, torch.Tensor) or (isinstance(text_or_ids, (list, tuple)) and text_or_ids
                                                 and all(isinstance(t, int) for t in text_or_ids)):
        return _check_ids(model, text_or_ids), None
    texts = [text_or_ids] if isinstance(text_or_ids, str) else list(text_or_ids or [])
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError("give a text, a list of texts, or token ids")
    if not all(t.strip() for t in texts):
        raise ConfigError("empty text: there is nothing to inspect; give some text")
    if tokenizer is None:
        raise ConfigError("this model has no tokenizer: pass token ids, or load a model with one")
    rows = []
    for t in texts:
        rows.append(tokenizer.encode(tokenizer.normalize(t) if hasattr(tokenizer, "normalize") else t))
    limit = model.config.block_size - model.config.embedding.position_offset
    if max(map(len, rows)) > limit:
        raise ConfigError(f"a text has {max(map(len, rows))} tokens but the model's context is {limit}; shorten it")
    T, pad = max(map(len, rows)), next((i for i in (getattr(tokenizer, "pad_id", None), model.config.pad_id)
                                        if i is not None), 0)
    ids, mask = torch.full((len(rows), T), pad, dtype=torch.long), torch.zeros((len(rows), T), dtype=torch.long)
    left = model.config.attention.causal and not _is_encoder_decoder(model)
    for i, r in enumerate(rows):
        at = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, at], mask[i, at] = torch.tensor(r), 1
    return _check_ids(model, ids), None if bool(mask.all()) else mask.to(next(model.parameters()).device)


def target_id(tokenizer, target: str | int, vocab_size: int) -> int:
    """The token id of `target`: an id, or a text that must encode to one token (" Paris", with its space)."""
    if isinstance(target, int) and not isinstance(target, bool):
        return check_index(target, vocab_size, "target id")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"target must be a token id or a non-empty text, got {target!r}")
    if tokenizer is None:
        raise ConfigError("a text target needs a tokenizer: pass the target's token id instead")
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"target {target!r} is {len(ids)} tokens ({ids}); give a text of one token or its id")
    return ids[0]


def token_strings(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    """One decoded string per id (special tokens kept); "" without a tokenizer or past its vocabulary."""
    if tokenizer is None:
        return [[""] * ids.shape[1] for _ in range(ids.shape[0])]
    n = tokenizer.vocab_size  # a model's vocabulary may be padded past the tokenizer's: those ids have no text
    return [[tokenizer.decode([i], skip_special_tokens=False) if i < n else "" for i in row] for row in ids.tolist()]
