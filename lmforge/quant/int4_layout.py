"""The byte layout of PyTorch's packed 4-bit CPU kernel, found on the running machine.

`_weight_int4pack_mm_for_cpu` reads weights in blocks of B rows; per block and input index k, B/2 bytes whose
byte j holds row lo[j] in its low nibble and row hi[j] in its high one. Its AVX-512 build has B = 64, byte j =
rows j | j+32; its AVX2 build B = 32, rows j | j+16; its generic build B = 32, rows 2j | 2j+1 (read off
`_convert_weight_to_int4pack_for_cpu` under each ATEN_CPU_CAPABILITY, torch 2.13). Which one runs is found on
the running machine (`probe_int4`): the layout is read off the converter, then the kernel must reproduce the
dequantized reference from weights packed that way. Files always hold the AVX-512 layout (`CANONICAL`, what
earlier files hold); `lmforge.quant.model` converts on load and save where the machine's differs, so a file is
the same bytes on every machine and memory holds one copy in the kernel's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.errors import ConfigError


def _rows64(n: int) -> int:
    return -(-n // 64) * 64


@dataclass(frozen=True)
class Int4Layout:
    """Rows `lo[j]` / `hi[j]` of each block of `block` rows share byte j (low / high nibble) per input."""

    block: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @property
    def name(self) -> str:
        """A short description, e.g. "64-row blocks, rows j | j+32"."""
        step = self.lo[1] - self.lo[0] if len(self.lo) > 1 else 1
        pair = f"rows {'2j' if step == 2 else 'j'} | {'2j+1' if step == 2 else f'j+{self.hi[0] - self.lo[0]}'}"
        return f"{self.block}-row blocks, {pair}"

    @cached_property
    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of a block: (its byte j, whether in the high nibble)."""
        byte, high = torch.zeros(self.block, dtype=torch.long), torch.zeros(self.block, dtype=torch.bool)
        byte[list(self.lo)], byte[list(self.hi)] = torch.arange(self.block // 2), torch.arange(self.block // 2)
        high[list(self.hi)] = True
        return byte, high


def _layout(block: int, lo, hi) -> Int4Layout:
    return Int4Layout(block, tuple(int(i) for i in lo), tuple(int(i) for i in hi))


CANONICAL = _layout(64, range(32), range(32, 64))
KNOWN_LAYOUTS = (CANONICAL, _layout(32, range(16), range(16, 32)), _layout(32, range(0, 32, 2), range(1, 32, 2)))


def pack_int4(q: torch.Tensor | np.ndarray, layout: Int4Layout | None = None) -> torch.Tensor:
    """(N, K) integers 0..15 -> (N64, K/2) uint8 in `layout` (default: the one this machine's kernel reads;
    N64 = N rounded up to a multiple of 64, padding rows zero).

    Done in numpy (torch's uint8 shifts, pad and transpose made loading SmolLM2's Q4_1 file take 4 s) into a
    buffer torch allocated, so that the result keeps torch's alignment (the packed kernels need it)."""
    layout = layout or int4_layout()
    if isinstance(q, torch.Tensor):
        q = q.detach().cpu().numpy()
    N, K = q.shape
    if K % 2:
        raise ConfigError(f"4-bit packing needs an even input width, got {K}")
    q = q.astype(np.uint8, copy=False)
    n64, B = _rows64(N), layout.block
    out = torch.empty(n64, K // 2, dtype=torch.uint8)
    dst = out.numpy().reshape(-1, K, B // 2)  # (blk, k, j)
    if N != n64:
        q = np.concatenate([q, np.zeros((n64 - N, K), np.uint8)])
    v = q.reshape(-1, B, K)  # (blk, row, k)
    lo, hi = _index(layout.lo), _index(layout.hi)
    dst[:] = (v[:, lo] | (v[:, hi] << 4)).transpose(0, 2, 1)
    return out


def _index(rows: tuple[int, ...]) -> slice | list[int]:
    """A slice where the rows are evenly spaced (a view, no gather), else the list."""
    step = rows[1] - rows[0]
    if step > 0 and all(b - a == step for a, b in zip(rows, rows[1:], strict=False)):
        return slice(rows[0], rows[-1] + 1, step)
    return list(rows)


def unpack_int4(packed: torch.Tensor, N: int, K: int, layout: Int4Layout | None = None) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K) uint8 values 0..15."""
    layout = layout or int4_layout()
    B = layout.block
    p = packed.view(-1, K, B // 2).transpose(1, 2)  # (blk, j, K)
    out = torch.empty(p.shape[0], B, K, dtype=torch.uint8)
    out[:, _index(layout.lo)] = p & 0x0F
    out[:, _index(layout.hi)] = p >> 4
    return out.view(-1, K)[:N]


def unpack_int4_rows(packed: torch.Tensor, rows: torch.Tensor, K: int, layout: Int4Layout | None = None
                     ) -> torch.Tensor:
    """Rows `rows` (any shape of indices) of `unpack_int4(packed, ...)`: (*rows.shape, K) uint8, read
    without unpacking the others (an embedding lookup in a quantized table)."""
    layout = layout or int4_layout()
    byte, high = layout.positions
    r = rows.reshape(-1)
    blk, i = r // layout.block, r % layout.block
    b = packed.view(-1, K, layout.block // 2)[blk, :, byte[i]]  # (n, K)
    v = torch.where(high[i][:, None], b >> 4, b & 0x0F)
    return v.view(*rows.shape, K)


def convert_int4(packed: torch.Tensor, N: int, K: int, src: Int4Layout, dst: Int4Layout) -> torch.Tensor:
    """Packed 4-bit weights in layout `src` -> the same values in layout `dst` (the tensor itself if equal)."""
    if src == dst:
        return packed
    return pack_int4(unpack_int4(packed, N, K, src), dst).to(packed.device)


def _torch_int4_layout() -> Int4Layout | None:
    """The layout `_convert_weight_to_int4pack_for_cpu` writes on this machine, read off three conversions of
    a 64 x 64 matrix whose entries' 4-bit digits spell their row and column; None where the op is missing or
    its output is not of the block form `Int4Layout` describes."""
    N = K = 64
    code = torch.arange(N)[:, None] * K + torch.arange(K)[None, :]  # 12 bits: row * 64 + k
    lo = torch.zeros(N * K // 2, dtype=torch.long)
    hi = torch.zeros_like(lo)
    for d in range(3):
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((code >> 4 * d) & 15).to(torch.int32), 1)
        if p.dtype != torch.uint8 or p.numel() != N * K // 2:
            return None
        p = p.reshape(-1).long()
        lo |= (p & 15) << 4 * d
        hi |= (p >> 4) << 4 * d
    for B in (64, 32, 16):  # find the block size whose form fits, then check every byte against it
        if lo[0] // K != 0 or (lo[:B // 2] % K != 0).any():
            continue
        cand = _layout(B, (lo[:B // 2] // K).tolist(), (hi[:B // 2] // K).tolist())
        if sorted(cand.lo + cand.hi) != list(range(B)):
            continue
        idx = torch.arange(lo.numel())
        blk, rest = idx // (K * B // 2), idx % (K * B // 2)
        k, j = rest // (B // 2), rest % (B // 2)
        rows_lo = blk * B + torch.tensor(cand.lo)[j]
        rows_hi = blk * B + torch.tensor(cand.hi)[j]
        if torch.equal(lo, rows_lo * K + k) and torch.equal(hi, rows_hi * K + k):
            return cand
    return None


def _int4_case(N: int = 128, K: int = 64, g: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(N, K // g, generator=gen) * 0.02 + 0.005).half()
    mn = (-8 * scale.float() + torch.randn(N, K // g, generator=gen) * 0.01).half()
    w = (q.float().view(N, -1, g) * scale.float()[..., None] + mn.float()[..., None]).view(N, K)
    x = torch.randn(5, K, generator=gen)
    return q, scale, mn, w, x


def _probe_int4() -> kernels.Choice:
    q, scale, mn, w, x = _int4_case()
    ref = F.linear(x, w)
    g = 32
    s = scale.float()
    z = mn.float() + 8 * s
    table = torch.stack([s, z], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    tol = 2 * kernels.eps(torch.bfloat16)  # activations, table and output rounded to bf16 (measured: 0.3 eps)
    try:
        found = _torch_int4_layout()
    except Exception:  # the converter is missing from this build: try the layouts we know
        found = None
    candidates = [found] if found else []
    candidates += [lay for lay in KNOWN_LAYOUTS if lay != found]
    first = None
    for lay in candidates:
        packed = pack_int4(q, lay)

        def fast(packed=packed):  # one row (decode) and several (prefill) take different code paths
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            return torch.cat([mm(x[:1].bfloat16(), packed, g, table), mm(x[1:].bfloat16(), packed, g, table)]).float()

        c = kernels.compare("int4", f"aten._weight_int4pack_mm_for_cpu, {lay.name}", fast, ref, tol,
                            "reference: dequantize + F.linear", detail=lay)
        if c.fast:
            if found is None or lay != found:
                c.reason += " (the converter's layout " + (found.name if found else "unknown") + " did not)"
            return c
        first = first or c
        if "raised" in first.reason:  # the kernel itself is missing or refuses: no layout will help
            break
    first.detail = CANONICAL
    return first


def probe_int4() -> kernels.Choice:
    """How 4-bit (and Q8_0) layers multiply here: torch's packed kernel in the layout that passed, or the
    dequantized reference. Cached per process."""
    return kernels.choose("int4", _probe_int4)


def int4_layout() -> Int4Layout:
    """The byte layout 4-bit weights are kept in, in memory, on this machine (the kernel's)."""
    return probe_int4().detail
