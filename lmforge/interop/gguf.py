"""GGUF, llama.cpp's one-file format: load a .gguf into lmforge and export lmforge models to one.

Reading goes through `gguf_file.GGUFFile` (a fast header parser and vectorised dequantization).

llama.cpp's converter permutes the rows of the Q and K projections of `llama` models so that its
RoPE can rotate adjacent pairs (x0, x1), (x2, x3), ...; our model (like transformers) rotates the
two halves of each head. `_unpermute` undoes it on load, `_permute` redoes it on export. `qwen2`
files are not permuted (llama.cpp runs them with the half-rotation, "NEOX", RoPE).

Writing uses `gguf.GGUFWriter`; Mistral is written as `llama` (as llama.cpp's converter does) with
its sliding window in `llama.attention.sliding_window`.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, quants
from gguf.constants import LlamaFileType, TokenType

from lmforge.config import AttentionConfig, Config, MLPConfig, NormConfig, PositionConfig
from lmforge.errors import ConfigError, FormatError
from lmforge.interop import hf
from lmforge.interop.gguf_file import READ_TYPES, GGUFFile, Q, TensorInfo, dequantize

__all__ = ["ARCHS", "EXPORT_TYPES", "READ_TYPES", "GGUFFile", "TensorInfo", "config_from_gguf", "dequantize",
           "load_gguf", "load_weights", "save_gguf", "tokenizer_from_gguf"]

# Types we write.
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
_FILE_TYPE = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
              Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1}
ARCHS = ("llama", "qwen2", "gpt2")  # llama covers Llama 1-3, Mistral, SmolLM, TinyLlama
_FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

# ---- GGUF metadata -> Config ---------------------------------------------------------------------

def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py `LlamaModel.permute`): per head, interleave halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `_permute`: llama.cpp's interleaved rows back to the rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_gguf(f: GGUFFile) -> Config:
    """Our `Config` for a GGUF file's metadata (architectures llama, qwen2, gpt2)."""
    m, src = f.metadata, f.path
    arch = m.get("general.architecture")
    if arch not in ARCHS:
        raise FormatError(f"{src}: architecture {arch!r} is not supported; supported: {', '.join(ARCHS)} "
                          "(llama includes Mistral, SmolLM2, TinyLlama)")
    if "token_embd.weight" not in f.tensors:
        raise FormatError(f"{src}: no token_embd.weight tensor; the file is incomplete")

    def key(name: str, default: Any = KeyError) -> Any:
        v = m.get(f"{arch}.{name}", default)
        if v is KeyError:
            raise FormatError(f"{src}: metadata key {arch}.{name} is missing; the file is incomplete")
        if isinstance(v, list):
            raise FormatError(f"{src}: {arch}.{name} varies per layer, which lmforge does not support")
        return v

    d, heads = key("embedding_length"), key("attention.head_count")
    common = dict(name=str(m.get("general.name") or src.stem), vocab_size=f.tensors["token_embd.weight"].shape[0],
                  block_size=key("context_length"), d_model=d, n_layer=key("block_count"))
    if arch == "gpt2":
        cfg = Config(family="gpt2", **common, attention=AttentionConfig(n_head=heads),
                     mlp=MLPConfig(hidden=key("feed_forward_length"), activation="gelu_tanh"),
                     norm=NormConfig(eps=_f32(key("attention.layer_norm_epsilon", 1e-5))),
                     position=PositionConfig("learned"), tie_embeddings=_tied(f))
    else:
        head_dim = key("attention.key_length", d // heads)
        if key("attention.value_length", head_dim) != head_dim or key("rope.dimension_count", head_dim) != head_dim:
            raise FormatError(f"{src}: value heads or partial RoPE differing from the head size "
                              f"({head_dim}) are not supported")
        if "rope_freqs.weight" in f.tensors:
            raise FormatError(f"{src}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 style) are not "
                              "supported")
        scaling = None
        kind = key("rope.scaling.type", "none")
        if kind == "linear":
            scaling = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif kind != "none":
            raise FormatError(f"{src}: RoPE scaling {kind!r} is not supported (none, linear)")
        window = key("attention.sliding_window", None) if arch == "llama" else None
        family = "qwen2" if arch == "qwen2" else "mistral" if window else "llama"
        qkv_bias = "blk.0.attn_q.bias" in f.tensors
        if arch == "qwen2" and not qkv_bias:
            raise FormatError(f"{src}: a qwen2 model needs Q/K/V biases (blk.N.attn_q.bias); the file has none")
        cfg = Config(family=family, **common,
                     attention=AttentionConfig(n_head=heads, n_kv_head=key("attention.head_count_kv", heads),
                                               head_dim=head_dim if head_dim * heads != d else None,
                                               qkv_bias=qkv_bias, out_bias=False, sliding_window=window),
                     mlp=MLPConfig(hidden=key("feed_forward_length"), activation="swiglu", bias=False),
                     norm=NormConfig(kind="rmsnorm", eps=_f32(key("attention.layer_norm_rms_epsilon")), bias=False),
                     position=PositionConfig(kind="rope", rope_theta=float(key("rope.freq_base", 10000.0)),
                                             rope_scaling=scaling),
                     tie_embeddings=_tied(f))
    cfg.bos_id = m.get("tokenizer.ggml.bos_token_id")
    cfg.eos_id = m.get("tokenizer.ggml.eos_token_id")
    cfg.pad_id = m.get("tokenizer.ggml.padding_token_id")
    try:
        return cfg.validate()
    except ConfigError as e:
        raise FormatError(f"{src}: the metadata describes an invalid model ({e})") from None


def _f32(x: float) -> float:
    # GGUF stores eps as float32: 1e-5 reads back as 9.99999974e-06; give the decimal it was written from
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _tied(f: GGUFFile) -> bool:
    # llama.cpp writes `output.weight` only when it differs from the embedding, except for GPT-2, whose
    # converter writes a copy of it: a byte-identical copy is still a tied head.
    if "output.weight" not in f.tensors:
        return True
    a, b = f.tensors["output.weight"], f.tensors["token_embd.weight"]
    return a.qtype == b.qtype and a.shape == b.shape and np.array_equal(f.raw(a.name), f.raw(b.name))


# ---- tensors ------------------------------------------------------------------------------------

def _names(cfg: Config) -> dict[str, str | tuple[str, ...]]:
    """Our key -> GGUF tensor name (or the names concatenated into it, in row order)."""
    out: dict[str, str | tuple[str, ...]] = {"tok_emb.weight": "token_embd.weight",
                                             "norm_f.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = "output.weight"
    gpt2 = cfg.family == "gpt2"
    if gpt2:
        out["pos_emb.weight"] = "position_embd.weight"
        out["norm_f.bias"] = "output_norm.bias"
    for i in range(cfg.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        out[p + "norm_1.weight"], out[p + "norm_2.weight"] = b + "attn_norm.weight", b + "ffn_norm.weight"
        out[p + "attn.proj.weight"], out[p + "mlp.proj.weight"] = b + "attn_output.weight", b + "ffn_down.weight"
        if gpt2:
            out[p + "attn.qkv.weight"], out[p + "mlp.fc.weight"] = b + "attn_qkv.weight", b + "ffn_up.weight"
            for ours, theirs in (("norm_1", "attn_norm"), ("norm_2", "ffn_norm"), ("attn.qkv", "attn_qkv"),
                                 ("attn.proj", "attn_output"), ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")):
                out[p + ours + ".bias"] = b + theirs + ".bias"
        else:
            out[p + "attn.qkv.weight"] = tuple(b + f"attn_{x}.weight" for x in "qkv")
            out[p + "mlp.fc.weight"] = (b + "ffn_gate.weight", b + "ffn_up.weight")
            if cfg.attention.qkv_bias:
                out[p + "attn.qkv.bias"] = tuple(b + f"attn_{x}.bias" for x in "qkv")
    return out


def _permuted(cfg: Config, gguf_name: str) -> int | None:
    """Heads to (un)permute a llama-arch Q or K tensor by, else None."""
    if _FAMILY_ARCH.get(cfg.family) != "llama":
        return None
    if ".attn_q." in gguf_name:
        return cfg.n_head
    if ".attn_k." in gguf_name:
        return cfg.n_kv_head
    return None


def _parts(cfg: Config, ours: str, rows: int) -> list[int]:
    """Row counts of the GGUF tensors fused into our tensor `ours` (Q/K/V or gate/up)."""
    if ".attn.qkv." in ours and cfg.family != "gpt2":
        return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    if ".mlp.fc." in ours and cfg.mlp.activation in ("swiglu", "geglu"):
        return [rows // 2, rows // 2]
    return [rows]


def _unpermute_index(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation: `w[index]` equals `_unpermute(w, n_head)`."""
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(0, 2, 1).reshape(-1)


def load_weights(model, f: GGUFFile, skip: frozenset[str] = frozenset()) -> None:
    """Fill `model` (a `DecoderLM` built from `config_from_gguf(f)`) with the file's weights, in place.

    `skip`: our keys filled elsewhere (the quantized layers of a native load, see gguf_quant.py).

    Every tensor's presence, shape and type is checked before anything is read (`FormatError` naming the
    tensor). Each is then dequantized straight into its place in our fused layout, its rows reordered
    while still quantized (a row holds whole blocks), so the weights are written once.
    """
    cfg: Config = model.config
    params = model.state_dict()
    plan = {}
    for ours, theirs in _names(cfg).items():
        if ours in skip:
            continue
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        want = tuple(params[ours].shape)
        for name, rows in zip(names, _parts(cfg, ours, want[0])):
            t = f.tensors.get(name)
            if t is None:
                raise FormatError(f"{f.path}: missing tensor {name!r}")
            if t.shape != (rows, *want[1:]):
                raise FormatError(f"{f.path}: tensor {name!r} has shape {t.shape}, the model described by the "
                                  f"metadata needs {(rows, *want[1:])}")
            if t.qtype not in READ_TYPES:
                raise FormatError(f"{f.path}: tensor {name!r} uses quantization type {t.type_name}, which lmforge "
                                  f"does not support; supported: {', '.join(q.name for q in READ_TYPES)}")
        plan[ours] = names

    def fill(ours: str) -> None:
        dst = params[ours]
        direct = dst.dtype == torch.float32 and dst.device.type == "cpu" and dst.is_contiguous()
        out = dst.numpy() if direct else np.empty(tuple(dst.shape), dtype=np.float32)
        r = 0
        for name in plan[ours]:
            t = f.tensors[name]
            n, heads = t.shape[0], _permuted(cfg, name)
            if heads and len(t.shape) == 2:
                dequantize(f.rows(name)[_unpermute_index(n, heads)], t.qtype, t.shape, out[r:r + n])
            else:
                f.tensor(name, out[r:r + n])
                if heads:  # a 1-D bias
                    out[r:r + n] = out[r:r + n][_unpermute_index(n, heads)]
            r += n
        if not direct:
            dst.copy_(torch.from_numpy(out))

    # numpy releases the GIL in its loops: one thread per core (1.0 s -> 0.6 s for SmolLM2 on 2 cores)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(fill, sorted(plan, key=lambda k: -params[k].numel())))


# ---- tokenizer ----------------------------------------------------------------------------------

_GPT2 = dict(pre_tokenizer_regex=None)
_DIGITS = dict(pre_tokenizer_regex=None, individual_digits=True)  # "\p{N}", then GPT-2's regex
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how to split text before BPE, as llama.cpp's llama-vocab.cpp does for that name.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    **{k: _GPT2 for k in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion", "phi-2")},
    **{k: _DIGITS for k in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{k: dict(pre_tokenizer_regex=_LLAMA3, ignore_merges=True)
       for k in ("llama3", "llama-bpe", "llama-v3", "falcon3", "dbrx", "smaug-bpe")},
    **{k: dict(pre_tokenizer_regex=_QWEN2) for k in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}


def tokenizer_from_gguf(f: GGUFFile):
    """An `HFTokenizer` built from the file's `tokenizer.*` metadata, or None (with a warning) when the
    file has no tokenizer or one lmforge cannot build (only byte-level BPE, "gpt2", is supported)."""
    from lmforge.tokenizers import HFTokenizer

    m = f.metadata
    if "lmforge.tokenizer_json" in m:  # written by save_gguf for tokenizers GGUF's keys cannot express
        import json

        import tokenizers

        from lmforge.tokenizers import CharTokenizer

        tok_json, config = m["lmforge.tokenizer_json"], json.loads(m.get("lmforge.tokenizer_config_json", "{}"))
        if CharTokenizer.matches(json.loads(tok_json)):
            return CharTokenizer(chat_template=config.get("chat_template"))
        return HFTokenizer(tokenizers.Tokenizer.from_str(tok_json), config)
    kind = m.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        warnings.warn(f"{f.path}: tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' is); loading "
                      "the model without a tokenizer: pass tokenizer=<folder> to lmforge.load", stacklevel=3)
        return None
    tokens = m.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or "tokenizer.ggml.merges" not in m:
        raise FormatError(f"{f.path}: a BPE tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    types = m.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    # Control tokens (<|im_start|>) are special; user-defined ones are matched whole, as llama.cpp does.
    specials = [t for t, k in zip(tokens, types) if k in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    # UNUSED entries are placeholders ("[PAD151646]") that pad the list to the embedding's rows
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != TokenType.UNUSED}
    pre = m.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"{f.path}: pre-tokenizer {pre!r} is unknown to lmforge; splitting text as GPT-2 does, "
                      "which may give other ids than llama.cpp", stacklevel=3)

    def name(key: str) -> str | None:
        i = m.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    ctx = m.get(f"{m.get('general.architecture')}.context_length")
    return HFTokenizer.from_bpe(
        vocab, m["tokenizer.ggml.merges"], special_tokens=specials, bos_token=name("bos_token_id"),
        eos_token=name("eos_token_id"), pad_token=name("padding_token_id"), unk_token=name("unknown_token_id"),
        add_bos_token=bool(m.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(m.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=m.get("tokenizer.chat_template"), model_max_length=ctx,
        **PRE_TOKENIZERS.get(pre, _GPT2))


def _tokenizer_fields(tok) -> dict[str, Any] | None:
    """tokenizer.ggml.* values for a byte-level BPE tokenizer, or None if GGUF's keys cannot express it."""
    import json

    try:
        j = json.loads(tok.tokenizer.to_str())
    except AttributeError:  # not an HFTokenizer (teenyGPT's characters)
        return None
    model, pre = j.get("model") or {}, j.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or (j.get("decoder") or {}).get("type") != "ByteLevel" or j.get("normalizer"):
        return None
    seq = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in seq]
    name = None
    if seq[-1].get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and seq[0].get("use_regex", True):
        name = "gpt-2"  # llama.cpp knows GPT-2's pre-tokenizer by this name, not "gpt2"
    elif kinds == ["Digits", "ByteLevel"] and seq[0].get("individual_digits") and seq[1].get("use_regex", True):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"]:
        regex = (seq[0].get("pattern") or {}).get("Regex")
        name = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}.get(regex)
    if name is None or (name == "llama-bpe") != bool(model.get("ignore_merges")):
        return None
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    tokens = [""] * tok.vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    if "" in tokens:  # holes in the id range
        return None
    specials = set(tok.special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "merges": merges, "pre": name,
            "types": [TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens]}


# ---- load and save ------------------------------------------------------------------------------

def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              dequantize: bool = False):
    """Load a .gguf file as an `LLM`: config from its metadata, tokenizer from its vocabulary and merges.

    Linears stored as Q8_0, Q4_0 or Q4_1 load into lmforge's quantized layers as they are (on the CPU,
    unless `dequantize`); everything else is dequantized to `dtype` (default float32), which is also the
    dtype the quantized layers compute in. The file is checked before weights are read.
    """
    from lmforge.interop import gguf_quant
    from lmforge.llm import LLM, empty_model
    from lmforge.quant.model import restore

    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    tok = tokenizer_from_gguf(f)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise FormatError(f"{f.path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                          f"{cfg.vocab_size} embeddings")
    model = empty_model(cfg, dtype or torch.float32, device)
    names = _names(cfg)
    plan = {} if dequantize or torch.device(device).type != "cpu" else gguf_quant.native_plan(cfg, f, names, _permuted)
    skip = {k for k, v in names.items() if (v if isinstance(v, tuple) else (v,)) in [p for p, _ in plan.values()]}
    if plan:
        restore(model, {"method": "gguf", "layers": gguf_quant.layer_infos(plan)})
    with torch.no_grad():
        load_weights(model, f, frozenset(skip))
        gguf_quant.fill(model, f, plan, _permuted, _unpermute_index)
    return LLM(model, tok, str(f.path))


def save_gguf(llm, path: str | os.PathLike, qtype: str = "f16") -> Path:
    """Write `llm` as a GGUF file that llama.cpp, `gguf.GGUFReader` and `lmforge.load` read.

    qtype: "f32" (exact), "f16", "bf16", "q8_0", "q4_0" or "q4_1" for the 2-D float weights; norms and
    biases stay F32, and a matrix whose rows are not a multiple of 32 falls back to F16 for the block types
    (as llama.cpp does). Layers of a quantized model keep their own GGUF type (see gguf_quant.py). The file
    is written beside its target and renamed into place.
    """
    if qtype.lower() not in EXPORT_TYPES:
        raise ConfigError(f"cannot export GGUF as {qtype!r}; supported: {', '.join(EXPORT_TYPES)}")
    want = EXPORT_TYPES[qtype.lower()]
    cfg: Config = llm.config
    arch = _FAMILY_ARCH.get(cfg.family)
    why = hf.exportable(cfg) if arch else f"family {cfg.family!r} has no GGUF layout"
    if why:
        raise ConfigError(f"cannot export {cfg.name!r} to GGUF: {why} (supported families: "
                          f"{', '.join(_FAMILY_ARCH)})")
    sc = cfg.position.rope_scaling
    if sc and (sc.get("type") or sc.get("rope_type")) != "linear":
        raise ConfigError(f"cannot export {cfg.name!r} to GGUF: RoPE scaling {sc} is not supported (linear is)")
    path = Path(path)
    if path.suffix != ".gguf":
        raise ConfigError(f"{path}: a GGUF file name must end in .gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        from lmforge.interop import gguf_quant

        quant = gguf_quant.quantized_layers(llm.model)  # our key -> (GGUF rows, type): written as they are
        w = GGUFWriter(str(tmp), arch)
        _write_metadata(w, llm, arch, gguf_quant.file_type(quant, want))
        sd = {k: v.detach().float().cpu() for k, v in llm.model.state_dict().items()}
        for ours, theirs in _names(cfg).items():
            names = theirs if isinstance(theirs, tuple) else (theirs,)
            raw, qt = quant.get(ours, (None, None))
            full = sd[ours] if raw is None else torch.from_numpy(raw)
            sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim] \
                if len(names) == 3 else [full.shape[0] // len(names)] * len(names)
            for name, part in zip(names, full.split(sizes)):
                heads = _permuted(cfg, name)
                part = (_permute(part, heads) if heads else part).contiguous().numpy()
                if raw is None:
                    _add_tensor(w, name, part, want)
                else:
                    w.add_tensor(name, part, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _add_tensor(w: GGUFWriter, name: str, a: np.ndarray, want: Q) -> None:
    if a.ndim < 2 or want == Q.F32:
        w.add_tensor(name, a.astype(np.float32))
    elif want == Q.F16 or (want in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and a.shape[-1] % 32):
        w.add_tensor(name, a.astype(np.float16))
    else:
        w.add_tensor(name, quants.quantize(a, want), raw_dtype=want)


def _write_metadata(w: GGUFWriter, llm, arch: str, want: Q) -> None:
    cfg: Config = llm.config
    w.add_name(cfg.name)
    w.add_file_type(_FILE_TYPE[want])
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp.hidden)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm.eps)
    else:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_rms_eps(cfg.norm.eps)
        w.add_rope_freq_base(cfg.position.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim * cfg.n_head != cfg.d_model:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.position.rope_scaling:
            w.add_string(f"{arch}.rope.scaling.type", "linear")
            w.add_rope_scaling_factor(float(cfg.position.rope_scaling["factor"]))
        if cfg.attention.sliding_window:
            w.add_sliding_window(cfg.attention.sliding_window)
    for key, value in (("bos", cfg.bos_id), ("eos", cfg.eos_id), ("pad", cfg.pad_id)):
        tok_value = getattr(llm.tokenizer, f"{key}_id", None) if llm.tokenizer is not None else None
        v = tok_value if tok_value is not None else value
        if v is not None:
            {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id}[key](v)
    tok = llm.tokenizer
    if tok is None:
        return
    fields = _tokenizer_fields(tok)
    if fields is not None and len(fields["tokens"]) < cfg.vocab_size:  # llama.cpp wants one entry per row
        pad = range(len(fields["tokens"]), cfg.vocab_size)
        fields["tokens"] += [f"[PAD{i}]" for i in pad]
        fields["types"] += [TokenType.UNUSED] * len(pad)
    if fields is None or len(fields["tokens"]) > cfg.vocab_size:
        import json

        tok_json, tok_config = tok._to_json()  # the tokenizer's own files, for lmforge to read back
        w.add_string("lmforge.tokenizer_json", json.dumps(tok_json, ensure_ascii=False))
        w.add_string("lmforge.tokenizer_config_json", json.dumps(tok_config, ensure_ascii=False))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(fields["pre"])
        w.add_token_list(fields["tokens"])
        w.add_token_types(fields["types"])
        w.add_token_merges(fields["merges"])
        unk = getattr(tok, "unk_token", None)
        if unk is not None and tok.token_to_id(unk) is not None:
            w.add_unk_token_id(tok.token_to_id(unk))
        w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
        w.add_add_eos_token(bool(getattr(tok, "add_eos_token", False)))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
