"""`lmforge.load()` and `LLM`: a model, its tokenizer, and what a user does with them."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import __version__
from lmforge.config import Config
from lmforge.errors import ConfigError, FormatError
from lmforge.infer.generate import GenerationConfig, TextStream, beam_search, generate_ids, iter_tokens, prepare_prompts
from lmforge.interop import hf
from lmforge.io import atomic_dir, write_json
from lmforge.models import DecoderLM, make_model
from lmforge.models.decoder import tied_key
from lmforge.models.ngram import MODEL_TYPE as NGRAM_TYPE
from lmforge.models.ngram import NGramLM
from lmforge.presets import get_preset

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Tokens that end an assistant turn in common chat templates, besides the tokenizer's EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """A language model with its tokenizer: generate, chat, save.

    Attributes:
        model: the `DecoderLM` (a `torch.nn.Module`: (B, T) ids -> (B, T, vocab) logits).
        tokenizer: an `lmforge.tokenizers.Tokenizer`, or None for a bare preset.
    """

    def __init__(self, model: DecoderLM, tokenizer=None, source: str = ""):
        self.model = model.eval()
        self.source = source
        self.tokenizer = tokenizer

    @property
    def tokenizer(self):
        """The tokenizer (None for a bare preset)."""
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        if tok is not None and tok.vocab_size > self.model.config.vocab_size:
            raise ConfigError(f"the tokenizer's vocabulary ({tok.vocab_size}) is larger than the model's "
                              f"({self.model.config.vocab_size}); use a matching tokenizer or a model with "
                              "vocab_size >= the tokenizer's")
        self._tokenizer = tok

    @property
    def config(self) -> Config:
        """The model's `Config`."""
        return self.model.config

    def __repr__(self) -> str:
        if isinstance(self.model, NGramLM):
            return (f"LLM({self.config.name!r}, family=ngram, order={self.config.order}, method={self.config.method}, "
                    f"ngrams={self.model.num_params():,})")
        p = next(self.model.parameters())
        return (f"LLM({self.config.name!r}, family={self.config.family}, params={self.model.num_params():,}, "
                f"dtype={p.dtype}, device={p.device})")

    # ---- generation ----------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer (a bare preset); load a model folder, or pass "
                              "tokenizer=<folder> to lmforge.load")
        return self.tokenizer

    def _need_decoder(self, what: str) -> None:
        if isinstance(self.model, NGramLM):
            raise ConfigError(f"{self.config.name!r} is an n-gram model: it scores text (llm.model(ids) gives "
                              f"log-probabilities; lmforge eval perplexity) but cannot {what} through the generator; "
                              "load a neural model (e.g. the LSTM or a transformer) for that")
        if not self.config.attention.causal:
            raise ConfigError(f"{self.config.name!r} is a bidirectional encoder: it cannot {what} text. Use "
                              "llm.embed(texts) (lmforge embed) for sentence embeddings, or load a decoder model")

    def embed(self, texts: str | list[str], batch_size: int = 32, pooling: str = "mean", normalize: bool = True,
              max_length: int | None = None, truncate: bool = False, progress: bool | None = None):
        """Sentence embeddings (N, d_model) as a float32 numpy array, from an encoder such as all-MiniLM-L6-v2.

        pooling: "mean" over real tokens (sentence-transformers' default) or "cls"; normalize: unit L2
        norm, so a dot product is a cosine similarity. Inputs longer than the context (or `max_length`)
        are an error unless `truncate`.
        """
        from lmforge.infer.embed import embed_texts

        if isinstance(self.model, NGramLM) or self.config.attention.causal:
            raise ConfigError(f"{self.config.name!r} is a causal decoder; embed() needs a bidirectional encoder "
                              "such as lmforge.load('minilm')")
        return embed_texts(self.model, self._need_tokenizer(), texts, batch_size=batch_size, pooling=pooling,
                           normalize=normalize, max_length=max_length, truncate=truncate, progress=progress)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt as generation sees it (the tokenizer's BOS included where it adds one)."""
        tok = self._need_tokenizer()
        if hasattr(tok, "normalize"):  # e.g. the teenyGPT character vocabulary: a-z and space only
            prompt = tok.normalize(prompt) if prompt.strip() else prompt
        return tok.encode(prompt, add_special_tokens=True)

    def eos_ids(self, chat: bool = False) -> list[int]:
        """Token ids that end generation: the tokenizer's and config's EOS, and end-of-turn tokens in chat."""
        tok = self.tokenizer
        ids = {i for i in (getattr(tok, "eos_id", None), self.config.eos_id) if i is not None}
        if tok is not None and not ids and getattr(tok, "pad_id", None) is not None:
            ids.add(tok.pad_id)  # teenyGPT: sequences end where padding starts
        if chat and tok is not None:
            ids |= {i for t in END_OF_TURN if (i := tok.token_to_id(t)) is not None}
        return sorted(ids)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for i in (getattr(tok, "pad_id", None), self.config.pad_id, getattr(tok, "eos_id", None)):
            if i is not None:
                return i
        return 0

    def generate(self, prompt: str | list[str], max_new_tokens: int = 128, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: list[str] | str | None = None, seed: int | None = None, truncate: bool = False,
                 stream: bool = False, num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, num_return_sequences: int = 1,
                 draft: LLM | str | None = None, prompt_lookup: bool | int = False, draft_tokens: int = 5,
                 compile: bool = False) -> str | list[str] | list[list[str]] | Iterator[str]:
        """Continue a prompt (or a batch of prompts of any lengths) and return the new text.

        temperature 0 is greedy decoding. With `stream=True` (one prompt) returns an iterator of text
        pieces as they are produced. Generation stops at EOS, at a stop string (not included in the
        output), at max_new_tokens or when the context is full.

        Beam search: `num_beams` > 1 (deterministic; the sampling settings are ignored), with
        `length_penalty`, `early_stopping` (True, False or "never") and `num_return_sequences` best beams,
        returned as a list of texts per prompt (best first) when that is > 1.

        Speculative decoding gives the same output as without it, faster when the drafts are good:
        `draft` is a smaller model of the same tokenizer (an LLM or anything `lmforge.load` takes);
        `prompt_lookup=True` (or the longest n-gram to match, default 3) drafts by copying from the
        context, for output that repeats its input. `draft_tokens` are proposed per step.

        `compile=True` runs the decode steps through `torch.compile` (compiled once per model, on the first
        call): faster per token, close to but not bit-identical with the default eager steps.
        """
        self._need_decoder("generate")
        lookup = 3 if prompt_lookup is True else int(prompt_lookup or 0)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, repetition_penalty=repetition_penalty,
                               stop=tuple([stop] if isinstance(stop, str) else stop or ()), seed=seed,
                               truncate=truncate, num_beams=num_beams, length_penalty=length_penalty,
                               early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                               prompt_lookup=lookup, draft_tokens=draft_tokens, compile=compile).validate()
        draft_model = self._draft_model(draft)
        if draft_model is not None and num_beams > 1:
            raise ConfigError("beam search and speculative decoding cannot be combined; choose one")
        if stream:
            if not isinstance(prompt, str):
                raise ConfigError("stream=True takes one prompt, not a list")
            return self._stream([self.encode_prompt(prompt)], gen, chat=False, draft=draft_model)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("no prompts given")
        return self._complete([self.encode_prompt(p) for p in prompts], gen, single=isinstance(prompt, str),
                              draft=draft_model)

    def _draft_model(self, draft: LLM | str | os.PathLike | None) -> DecoderLM | None:
        """The draft's model, after checking that it shares this model's tokenizer."""
        if draft is None:
            return None
        if not isinstance(draft, LLM):
            draft = load(draft, dtype=self.model.tok_emb.weight.dtype, device=str(self.model.tok_emb.weight.device))
        mine, theirs = self._need_tokenizer(), draft.tokenizer
        if theirs is None:
            raise ConfigError("the draft model has no tokenizer, so it cannot be checked against this model's; "
                              "give it the same tokenizer as the target")
        if theirs is not mine and (theirs.vocab_size != mine.vocab_size or any(
                theirs.id_to_token(i) != mine.id_to_token(i) for i in range(mine.vocab_size))):
            raise ConfigError(f"the draft model's tokenizer ({theirs.vocab_size} tokens) differs from this "
                              f"model's ({mine.vocab_size} tokens): speculative decoding needs a draft of the "
                              "same tokenizer (e.g. a smaller model of the same family), or use prompt_lookup")
        return draft.model

    def _complete(self, ids: list[list[int]], gen: GenerationConfig, single: bool, chat: bool = False,
                  draft: DecoderLM | None = None):
        if gen.num_beams > 1:
            model, ids = self._runner(ids, gen)
            hyps = beam_search(model, ids, gen, self.eos_ids(chat), self._pad_id())
            texts = [[self._text(h.tokens, gen) for h in row] for row in hyps]
            if gen.num_return_sequences == 1:
                texts = [row[0] for row in texts]
        else:
            model, ids = self._runner(ids, gen, draft)
            outs = generate_ids(model, ids, gen, self.eos_ids(chat), self._pad_id(), draft=draft)
            texts = [self._text(out, gen) for out in outs]
        return texts[0] if single else texts

    def _runner(self, ids: list[list[int]], gen: GenerationConfig, draft: DecoderLM | None = None):
        """(the model the generator runs, its prompts). A decoder continues the prompts; an encoder-decoder
        encodes them once and decodes from its start token, with the encoder output bound to the decoder."""
        if not self.config.is_encoder_decoder:
            return self.model, ids
        if draft is not None or gen.prompt_lookup:
            raise ConfigError("speculative decoding is for decoder-only models; an encoder-decoder decodes "
                              "without draft / prompt_lookup")
        start = self.config.decoder_start_id
        start = self._pad_id() if start is None else start
        src, mask = prepare_prompts(ids, self.config.block_size, gen, self._pad_id())
        device = self.model.tok_emb.weight.device
        src, mask = src.to(device), None if mask is None else mask.to(device)
        with torch.inference_mode():
            memory = self.model.encode(src, mask)
        return self.model.bind(memory, mask), [[start]] * len(ids)

    def _text(self, ids: list[int], gen: GenerationConfig) -> str:
        s = TextStream(self._decode, gen.stop)
        for t in ids:
            s.push(t)
            if s.stopped:
                break
        s.flush()  # takes in a trailing incomplete character
        return s.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _stream(self, ids: list[list[int]], gen: GenerationConfig, chat: bool,
                draft: DecoderLM | None = None) -> Iterator[str]:
        s = TextStream(self._decode, gen.stop)
        eos = set(self.eos_ids(chat))
        model, ids = self._runner(ids, gen, draft)
        for nxt in iter_tokens(model, ids, gen, sorted(eos), self._pad_id(), draft=draft):
            t = int(nxt[0])
            if t in eos:
                break
            piece = s.push(t)
            if piece:
                yield piece
            if s.stopped:
                return
        rest = s.flush()
        if rest:
            yield rest

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0,
             stream: bool = False, **kwargs: Any) -> str | Iterator[str]:
        """Reply to a conversation, rendered with the tokenizer's chat template (ChatML if it has none).

        messages: [{"role": "system" | "user" | "assistant", "content": "..."}, ...]
        Other keyword arguments are `generate`'s (sampling, beam search, `draft`, `prompt_lookup`).
        """
        self._need_decoder("chat")
        tok = self._need_tokenizer()
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        draft = self._draft_model(kwargs.pop("draft", None))
        if kwargs.get("prompt_lookup") is True:
            kwargs["prompt_lookup"] = 3
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, **kwargs).validate()
        if stream:
            return self._stream([ids], gen, chat=True, draft=draft)
        out = self._complete([ids], gen, single=True, chat=True, draft=draft)
        return [t.strip() for t in out] if isinstance(out, list) else out.strip()

    # ---- compression ---------------------------------------------------------------------------
    def quantize(self, method: str, **options: Any) -> LLM:
        """A new `LLM` whose linear layers are quantized (this one is left as it was).

        method: "int8" (per-channel), "int4" (group-wise, `group_size=32|64|128`), "nf4" (`blocksize`,
        `double_quant`) or "q8_0". See `lmforge.quant.quantize` for the options.
        """
        from lmforge.quant import is_quantized, quantize

        if is_quantized(self.model):  # before copying anything
            quantize(self.model, method, **options)
        p = next(self.model.parameters())
        model = empty_model(self.config, p.dtype, p.device)  # a fresh copy (deepcopy cannot copy packed weights)
        model.load_state_dict(self.model.state_dict())
        return LLM(quantize(model, method, **options), self.tokenizer, self.source)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None,
             base: dict | None = None) -> Path:
        """Write a model folder: config.json, model.safetensors, tokenizer files, lmforge.json.

        A model with adapters (`lmforge.adapt`) is written as its base weights plus adapter_config.json and
        adapter_model.safetensors (peft's format); `lmforge.load` puts the adapter back on. With `base`
        ({"source": a folder, .gguf file or short name, "dtype", ...}: where the frozen base comes from) the
        base weights are not written: lmforge.json records `base` and `lmforge.load` rebuilds the base from
        its source (the adapter-only variant run checkpoints use).

        Families with a `transformers` layout (GPT-2, Llama, Mistral, Qwen2) are written in it, so
        `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads them too. The write is atomic.
        """
        from lmforge.adapt import base_state_dict, has_adapters, save_adapter

        cfg = self.config
        if isinstance(self.model, NGramLM):  # counts, not weights: config.json + ngram.safetensors
            with atomic_dir(folder) as tmp:
                self.model.save(tmp)
                if self.tokenizer is not None:
                    self.tokenizer.save(tmp)
            return Path(folder)
        dt = resolve_dtype(dtype)
        quant = getattr(self.model, "quantization", None)
        adapted = has_adapters(self.model)  # base weights as usual, adapters beside them in peft's format
        if base is not None and not adapted:
            raise ConfigError("save(base=...) writes a model's adapters without its base, but this model has none")
        if quant and base is None:
            return self._save_quantized(folder, dt, quant)
        layout = "hf" if hf.exportable(cfg) is None else "native"
        tensors = None
        if base is None:
            state = base_state_dict(self.model) if adapted else self.model.state_dict()
            sd = {k: (v.to(dt) if dt and v.is_floating_point() else v).detach().cpu() for k, v in state.items()}
            tensors = hf.to_hf_state_dict(cfg, sd) if layout == "hf" else \
                {k: v for k, v in sd.items() if k != self.model.tied_key}
        if layout == "hf":
            config_json = hf.to_hf_config(cfg)
            config_json["torch_dtype"] = str(dt or next(self.model.parameters()).dtype).removeprefix("torch.")
        else:
            config_json = {"model_type": "lmforge", **cfg.to_dict()}
        meta = {"format_version": 1, "lmforge_version": __version__, "weights_layout": layout, "config": cfg.to_dict()}
        if base is not None:
            meta["base"] = base
        with atomic_dir(folder) as tmp:
            if tensors is not None:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                          metadata={"format": "pt"})
            write_json(tmp / "config.json", config_json)
            write_json(tmp / "lmforge.json", meta)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
            if adapted:
                from lmforge.adapt import LoRALinear, adapter_layers
                from lmforge.adapt.bottleneck import save_native_adapter

                lora = all(type(m) is LoRALinear for _, m in adapter_layers(self.model))
                (save_adapter if lora else save_native_adapter)(self.model, tmp)
        return Path(folder)

    def _save_quantized(self, folder, dt: torch.dtype | None, quant: dict) -> Path:
        # lmforge's own layout: transformers has no reader for these layers
        from lmforge.quant.model import quant_state_dict

        cfg = self.config
        tensors = quant_state_dict(self.model, dt)
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            write_json(tmp / "config.json", {"model_type": "lmforge", **cfg.to_dict(), "quantization": quant})
            write_json(tmp / "lmforge.json", {"format_version": 1, "lmforge_version": __version__,
                                              "weights_layout": "native", "config": cfg.to_dict(),
                                              "quantization": quant})
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
        return Path(folder)


# ---- loading --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Build modules without random initialisation: their weights are about to be replaced.

    Initialising SmolLM2-135M's weights takes ~3 s on 2 cores, building without it ~0.05 s. Buffers that
    are computed rather than loaded (RoPE tables) are still built normally.
    """
    names = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def empty_model(cfg: Config, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> DecoderLM:
    """A `DecoderLM` whose parameters are allocated but not initialised, for a loader to fill in place.

    Computed buffers (RoPE tables) are real. Tied weights stay tied.
    """
    with _no_init(), torch.device(device):
        model = make_model(cfg, init_weights=False)
    if dtype is not None:
        for p in model.parameters():  # swap storage instead of converting uninitialised memory
            p.data = torch.empty(p.shape, dtype=dtype, device=p.device)
    return model.to(dtype=dtype) if dtype is not None else model


def build(cfg: Config, state_dict: dict[str, torch.Tensor] | None, source: str,
          dtype: torch.dtype | None = None, device: str | torch.device = "cpu", assign: bool = False) -> DecoderLM:
    """A `DecoderLM` for `cfg` holding `state_dict`, checked tensor by tensor before anything loads.

    With `assign=True` the model takes the given tensors as its parameters instead of copying them (for
    loaders that own freshly read tensors: no second copy of the weights, no time spent initialising).
    """
    if state_dict is None:
        model = make_model(cfg, init_weights=True)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)
    with _no_init():
        model = make_model(cfg, init_weights=False)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise FormatError(f"{source}: weights do not match the config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise FormatError(f"{source}: tensor {k!r} has shape {tuple(state_dict[k].shape)}, "
                              f"the config needs {tuple(v.shape)}")
    if not assign:
        model.load_state_dict(state_dict)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)
    # One floating dtype for all weights: the requested one, else the embedding's as stored.
    dtype = dtype or state_dict["tok_emb.weight"].dtype
    cast = {}
    for k, v in state_dict.items():
        want = dtype if v.is_floating_point() else v.dtype
        cast[k] = v.to(device=device, dtype=want).contiguous()  # no copy when already right
    model.load_state_dict(cast, assign=True)
    if cfg.tie_embeddings:  # assign gives each key its own Parameter: tie them again
        model.tie_weights()
    return model.to(device=device, dtype=dtype)  # the buffers; parameters are already there


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = [folder / "model.safetensors"]
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise FormatError(f"{index}: not a valid safetensors index ({e})") from e
        files = [folder / s for s in shards]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise FormatError(f"{folder}: missing weights file {f.name}")
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise FormatError(f"{f}: cannot read safetensors file ({e}); the file is truncated or corrupt") from e
    return out


def _load_folder(folder: Path, dtype, device, allow_pickle: bool) -> LLM:
    from lmforge.tokenizers import load_tokenizer

    meta_path, cfg_path = folder / "lmforge.json", folder / "config.json"
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        config_json = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    except ValueError as e:
        raise FormatError(f"{folder}: config file is not valid JSON ({e})") from e
    if config_json is not None and config_json.get("model_type") == NGRAM_TYPE:
        tok = load_tokenizer(folder) if (folder / "tokenizer.json").exists() else None
        return LLM(NGramLM.load(folder), tok, str(folder))
    if meta is not None:
        cfg = Config.from_dict(meta["config"])
        layout = meta.get("weights_layout", "native")
    elif config_json is not None:
        cfg, layout = hf.from_hf_config(config_json, str(cfg_path)), "hf"
    else:
        raise FormatError(f"{folder}: no config.json or lmforge.json; not a model folder")
    has_weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    if meta is not None and meta.get("base") and not has_weights:  # adapters only: the base from its source
        from lmforge.adapt.state import check_fingerprint, load_base

        llm = _with_adapters(folder, load_base(folder, meta["base"], cfg, dtype, device))
        check_fingerprint(folder, meta["base"], llm.model)
        return llm
    if has_weights:
        tensors = _read_safetensors(folder)
    elif layout == "dcp":  # a ddp/fsdp run's sharded checkpoint
        from lmforge.interop.dcp import read_model_tensors

        tensors, layout = read_model_tensors(folder), "native"
    else:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if not pickles:
            raise FormatError(f"{folder}: no model.safetensors found")
        tensors = {}
        for p in pickles:
            tensors.update(_load_pickle(p, allow_pickle))
    if dtype is None and any(v.dtype == torch.bfloat16 for v in tensors.values()):
        from lmforge.precision import load_dtype  # bf16 as stored, except where this CPU only emulates it

        dtype = load_dtype(None, torch.bfloat16, device, what=f"{folder.name}: the weights")
    if meta is not None and meta.get("quantization"):
        from lmforge.quant.model import load_quantized_state, restore

        model = load_quantized_state(restore(empty_model(cfg), meta["quantization"]), tensors, dtype, device,
                                     str(folder))
        tok = load_tokenizer(folder) if (folder / "tokenizer.json").exists() else None
        return LLM(model, tok, str(folder))
    sd = hf.from_hf_state_dict(cfg, tensors, str(folder)) if layout == "hf" else dict(tensors)
    if layout != "hf" and tied_key(cfg):
        sd[tied_key(cfg)] = sd.get("tok_emb.weight")
    return _with_adapters(folder, build(cfg, sd, str(folder), dtype, device, assign=True))


def _with_adapters(folder: Path, model: nn.Module) -> LLM:
    """The folder's adapters (if any) put on `model`, with the folder's tokenizer."""
    from lmforge.tokenizers import load_tokenizer

    if (folder / "adapter_config.json").is_file():  # a fine-tuned model saved as base + adapter
        from lmforge.adapt import load_adapter

        load_adapter(model, folder)
    elif (folder / "lmforge_adapter.json").is_file():  # base + lmforge-format adapters (bottleneck)
        from lmforge.adapt.bottleneck import load_native_adapter

        load_native_adapter(model, folder)
    tok = load_tokenizer(folder) if (folder / "tokenizer.json").exists() else None
    return LLM(model, tok, str(folder))


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise FormatError(f"{path}: refusing to read a pickle file ({path.suffix}): unpickling can run code. "
                          "Convert it to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust it; "
                          "it is then read with weights_only=True")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FormatError(f"{path}: cannot load with weights_only=True ({e})") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError(f"{path}: expected a dict of tensors")
    return obj


def load(source: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
         tokenizer: str | os.PathLike | None = None, allow_pickle: bool = False, dequantize: bool = False) -> LLM:
    """Load a model from a preset, a model folder (lmforge or Hugging Face), a .gguf file or a short name.

    Args:
        source: "preset:<name>" (random weights), a folder with config.json + model.safetensors,
            a .gguf file, or a short name such as "smollm2".
        dtype: "float32", "bfloat16" or "float16" (default: as stored, float32 for presets and .gguf files;
            bf16-stored weights load as float32 where the CPU has no native bf16: `lmforge.precision`).
        device: where to put the weights.
        tokenizer: a folder or tokenizer.json to use instead of the model's own.
        allow_pickle: allow .bin/.pt weights (read with weights_only=True); off by default.
        dequantize: expand a GGUF file's Q8_0/Q4_0/Q4_1 linears to float (`dtype`) instead of running
            them quantized (the default on the CPU).
    """
    dt = resolve_dtype(dtype)
    src = str(source)
    if dt == torch.bfloat16:  # kept as asked; a one-line warning where this CPU only emulates bf16
        from lmforge.precision import load_dtype

        load_dtype(dt, dt, device, what=f"{src}: dtype")
    if src.startswith("preset:"):
        cfg = get_preset(src.removeprefix("preset:"))
        tok = None
        if cfg.name == "teenygpt" or cfg.name == "tiny-teenygpt":
            from lmforge.tokenizers import CharTokenizer

            tok = CharTokenizer()
        llm = LLM(build(cfg, None, src, dt, device), tok, src)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            from lmforge.interop import registry

            resolved = registry.resolve(src)
            if resolved is None:
                raise FormatError(f"{src}: no such file or folder, and not a preset (use 'preset:<name>') "
                                  f"or a known short name ({', '.join(registry.SHORT_NAMES)})")
            path = resolved
        if path.is_dir():
            llm = _load_folder(path, dt, device, allow_pickle)
        elif path.suffix == ".gguf":
            from lmforge.interop import gguf as gguf_io

            llm = gguf_io.load_gguf(path, dtype=dt, device=device, dequantize=dequantize)
        elif path.suffix in (".bin", ".pt", ".pth"):
            raise FormatError(f"{path}: a bare pickle file has no config; put it in a model folder with "
                              "config.json (pickles also need allow_pickle=True)")
        elif path.name == "tokenizer.json":
            raise FormatError(f"{path}: this is a tokenizer, not a model")
        else:
            raise FormatError(f"{path}: unknown model format; expected a model folder, a .gguf file or "
                              "'preset:<name>'")
    if tokenizer is not None:
        from lmforge.tokenizers import load_tokenizer

        llm.tokenizer = load_tokenizer(tokenizer)
    return llm
