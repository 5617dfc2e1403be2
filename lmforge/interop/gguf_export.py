"""Export lmforge models to GGUF, llama.cpp's one-file format (`gguf.GGUFWriter`).

Mistral is written as `llama` (as llama.cpp's converter does) with its sliding window in
`llama.attention.sliding_window`; Q and K rows are permuted into llama.cpp's order (gguf_layout.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, quants
from gguf.constants import LlamaFileType, TokenType

from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.interop import hf
from lmforge.interop.gguf_file import Q
from lmforge.interop.gguf_layout import FAMILY_ARCH, LLAMA3_REGEX, QWEN2_REGEX, permute, permuted_heads, tensor_names

__all__ = ["EXPORT_TYPES", "save_gguf"]

# Types we write.
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
_FILE_TYPE = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
              Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1}


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
    arch = FAMILY_ARCH.get(cfg.family)
    why = hf.exportable(cfg) if arch else f"family {cfg.family!r} has no GGUF layout"
    if why:
        raise ConfigError(f"cannot export {cfg.name!r} to GGUF: {why} (supported families: "
                          f"{', '.join(FAMILY_ARCH)})")
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
        for ours, theirs in tensor_names(cfg).items():
            names = theirs if isinstance(theirs, tuple) else (theirs,)
            raw, qt = quant.get(ours, (None, None))
            full = sd[ours] if raw is None else torch.from_numpy(raw)
            sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim] \
                if len(names) == 3 else [full.shape[0] // len(names)] * len(names)
            for name, part in zip(names, full.split(sizes)):
                heads = permuted_heads(cfg, name)
                part = (permute(part, heads) if heads else part).contiguous().numpy()
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
        name = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}.get(regex)
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
