"""`lmforge.load()` and `LLM`: a model, its tokenizer, and what a user does with them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.config import Config
from lmforge.errors import NO_TOKENIZER, ConfigError
from lmforge.infer.generate import GenerationConfig, TextStream, beam_search, generate_ids, iter_tokens, prepare_prompts
from lmforge.interop import hf
from lmforge.io import atomic_dir, write_json
from lmforge.loading import check_tokenizer, load_model, resolve_dtype
from lmforge.models import DecoderLM
from lmforge.models.build import empty_model
from lmforge.models.ngram import NGramLM
from lmforge.version import __version__

# Tokens that end an assistant turn in common chat templates, besides the tokenizer's EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


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
        check_tokenizer(self.model, tok)
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
            raise ConfigError(NO_TOKENIZER)
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
        from lmforge.infer.embed import embed_texts, encoder_tokenizer

        return embed_texts(self.model, encoder_tokenizer(self.model, self.tokenizer), texts, batch_size=batch_size,
                           pooling=pooling, normalize=normalize, max_length=max_length, truncate=truncate,
                           progress=progress)

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

    # ---- inspection ----------------------------------------------------------------------------
    def inspect(self, text_or_ids: str | list[str] | torch.Tensor,
                capture: tuple[str, ...] = ("attention", "residual", "mixer_out", "mlp_out"), interventions=None,
                **kw: Any):
        """Run the model once on a text (or texts, or ids) and return what it computed inside: a `Trace`.

        capture: any of "attention" (probabilities per head, fp32), "residual" (the embedding output, then the
        stream after each block), "mixer_out", "mlp_out". interventions: an `lmforge.inspect.Interventions`
        (heads masked, activations zeroed or patched, steering vectors). Other keywords are
        `lmforge.inspect.trace`'s (grad, decoder_input_ids, head_weights). The model's normal calls are not
        changed: hooks exist only during this call.
        """
        from lmforge.models.capture import encode_inputs, trace

        ids, mask = encode_inputs(self.model, self.tokenizer, text_or_ids)
        kw.setdefault("attention_mask", mask)
        return trace(self.model, ids, capture=capture, interventions=interventions, tokenizer=self.tokenizer, **kw)

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
    model, tok, where = load_model(source, dtype=dtype, device=device, tokenizer=tokenizer,
                                   allow_pickle=allow_pickle, dequantize=dequantize)
    return LLM(model, tok, where)
