"""GGUF-native quantized weights: Q8_0, Q4_0 and Q4_1 tensors straight into lmforge's quantized layers, and
quantized layers back out as GGUF blocks.

Loading: a linear whose GGUF tensors (Q, K, V or gate, up, fused by rows) are all Q4_0, all Q4_1 or all
Q8_0 becomes an `Int4Linear` (group 32; Q4_1's d and m are its fp16 scale and min, Q4_0's min is -8 d) or
a `Q8Linear`. Rows are reordered (llama.cpp's Q/K permutation) while still in blocks; nothing is expanded
to float, and `dequantize()` of the layer equals `gguf.quants.dequantize` bit for bit. Other types (F16,
BF16, K-quants) are dequantized to the model's float dtype as before. With tied embeddings the quantized
LM head also serves the token embedding.

Export: an `Int4Linear` with group 32 is written as Q4_0 when every min is -8 x scale, else as Q4_1; a
`Q8Linear` as Q8_0: the same bytes, no re-quantization. Other quantized layers (int8 per-channel, int4 with
larger groups, NF4) have no GGUF twin: their dequantized weights are quantized to Q8_0 (int8) or Q4_1.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.config import Config
from lmforge.interop.gguf_file import GGUFFile, Q
from lmforge.quant.linear import Int4Linear, Q8Linear

NATIVE_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
_BLOCK_BYTES = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}


def native_plan(cfg: Config, f: GGUFFile, names: dict, permuted) -> dict[str, tuple[tuple[str, ...], int]]:
    """{our module name: (GGUF tensor names fused into it, their common type)} for the linears that load
    quantized: every part of one of NATIVE_TYPES, all the same type."""
    plan = {}
    for ours, theirs in names.items():
        if not ours.endswith(".weight") or ours.startswith(("norm", "pos_emb")) or ".norm_" in ours:
            continue
        module = ours.removesuffix(".weight")
        if module == "tok_emb":
            if not cfg.tie_embeddings:
                continue
            module = "lm_head"  # the tied head, read from the embedding table
        parts = theirs if isinstance(theirs, tuple) else (theirs,)
        infos = [f.tensors.get(p) for p in parts]
        if any(t is None or len(t.shape) != 2 for t in infos):
            continue  # load_weights reports what is missing
        types = {t.qtype for t in infos}
        if len(types) == 1 and (qt := next(iter(types))) in NATIVE_TYPES:
            plan[module] = (tuple(parts), qt)
    return plan


def layer_infos(plan: dict) -> dict[str, dict]:
    """The `restore` layer map for a native plan."""
    return {m: ({"method": "q8_0"} if qt == Q.Q8_0 else {"method": "int4", "group_size": 32})
            for m, (_parts, qt) in plan.items()}


def _rows(f: GGUFFile, cfg: Config, parts: tuple[str, ...], permuted, unpermute_index) -> np.ndarray:
    """The fused layer's raw rows (R, bytes per row), llama.cpp's Q/K row order undone."""
    out = []
    for name in parts:
        rows = f.rows(name)
        heads = permuted(cfg, name)
        out.append(rows[unpermute_index(rows.shape[0], heads)] if heads else rows)
    return np.concatenate(out) if len(out) > 1 else np.ascontiguousarray(out[0])


def split_blocks(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, ...]:
    """Raw rows (R, nb * block bytes) -> Q8_0: (q int8 (R, 32 nb), d fp16 (R, nb)); Q4_0 / Q4_1: (q uint8
    0..15 (R, 32 nb), d fp16 (R, nb), m fp16 (R, nb)), m = -8 d for Q4_0."""
    R = raw.shape[0]
    b = raw.reshape(R, -1, _BLOCK_BYTES[Q(qtype)])
    d = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0]
    if qtype == Q.Q8_0:
        return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(R, -1), d
    qs = b[..., -16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(R, -1)  # low nibbles are values 0-15
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0] if qtype == Q.Q4_1 else d * np.float16(-8)
    return q, d, m


def fill(model, f: GGUFFile, plan: dict, permuted, unpermute_index) -> None:
    """Fill the quantized layers `restore` built for `plan` from the file's blocks."""
    cfg = model.config
    for module, (parts, qtype) in plan.items():
        layer = model.get_submodule(module)
        fields = [torch.from_numpy(a) for a in split_blocks(_rows(f, cfg, parts, permuted, unpermute_index), qtype)]
        layer.set_quantized(*fields)


def quantized_layers(model) -> dict[str, tuple[np.ndarray, int]]:
    """{our weight key: (GGUF rows, GGML type)} for every quantized linear of `model` (the tied embedding's
    key maps to the LM head's table)."""
    from torch import nn

    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name and hasattr(m, "dequantize") and not isinstance(m, nn.Linear) and not name.startswith("tok_emb."):
            out[f"{name}.weight"] = export_blocks(m)
    if "lm_head.weight" in out and model.config.tie_embeddings:
        out["tok_emb.weight"] = out.pop("lm_head.weight")
    return out


def file_type(quant: dict, default: int) -> int:
    """The type most of a quantized model's weights have (GGUF's general.file_type), else `default`."""
    types = [qt for _raw, qt in quant.values()]
    return max(set(types), key=types.count) if types else default


def export_blocks(layer) -> tuple[np.ndarray, int]:
    """A quantized layer's weight as GGUF rows (R, bytes per row) uint8 and its GGML type: the stored blocks
    for Q8Linear and Int4Linear(group 32); the others re-quantized from their dequantized weight to Q8_0
    (int8 per-channel) or Q4_1 (int4 with larger groups, NF4, ternary)."""
    if isinstance(layer, Q8Linear):
        q = layer.int8_values().numpy()
        d = layer.scales.numpy()
        return _join(d, None, q.view(np.uint8).reshape(q.shape[0], -1, 32)), Q.Q8_0
    if isinstance(layer, Int4Linear) and layer.group_size == 32:
        from lmforge.quant.linear import unpack_int4

        q = unpack_int4(layer.qweight, layer.out_features, layer.in_features).numpy()
        q = q.reshape(q.shape[0], -1, 32)
        nib = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
        d, m = layer.scales.numpy(), layer.mins.numpy()
        if np.array_equal(m, d * np.float16(-8)):
            return _join(d, None, nib), Q.Q4_0
        return _join(d, m, nib), Q.Q4_1
    from lmforge.quant.int8 import Int8Linear

    lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    lin.weight = torch.nn.Parameter(layer.dequantize(), requires_grad=False)
    twin = Q8Linear.from_linear(lin) if isinstance(layer, Int8Linear) else Int4Linear.from_linear(lin, 32)
    return export_blocks(twin)


def _join(d: np.ndarray, m: np.ndarray | None, qs: np.ndarray) -> np.ndarray:
    """Blocks [d fp16][m fp16]?[qs bytes] per (row, block) -> (R, nb * block bytes) uint8."""
    R, nb = d.shape
    cols = [np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(R, nb, 2)]
    if m is not None:
        cols.append(np.ascontiguousarray(m.astype(np.float16)).view(np.uint8).reshape(R, nb, 2))
    cols.append(qs.reshape(R, nb, -1))
    return np.concatenate(cols, axis=-1).reshape(R, -1)
