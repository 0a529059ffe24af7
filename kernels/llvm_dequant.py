"""Prefill (batch > 1) codebook GEMM by dequantization: codes -> a dense weight tile in scratch memory
(llvmlite-generated, multi-threaded over rows), then one dense matmul through oneDNN per tile.

Two element types:

* float32 (`dtype=torch.float32`, EDGETK_PREFILL=dense, and what the default "auto" mode picks for layers where
  the LUT GEMM loses, see `llvm_codebook.prefill_choice`): the codewords are copied exactly, so the result equals
  the reference up to summation order (~1e-6), like the LUT GEMM; the dense product runs at oneDNN's fp32 rate.
* bfloat16 (opt-in, EDGETK_PREFILL=bf16): x and the codewords are rounded to bf16 (8-bit mantissa), so the
  result is ~50 dB SNR from the reference (tested >= 40 dB), like the int8 LUT at batch 1; the product runs on
  AMX / AVX-512 BF16 where the host has them (`host_ok`).

Why: at 64 tokens a LUT GEMM builds n_vec * K * v * tokens products (the whole LUT, per token) however few rows the
layer has, and a 576-row layer then costs more than the dense fp32 product. Dequantizing costs one codeword copy per
code (amortized over the tokens) and the dense product runs at the FMA / matrix units' rate.

Formats: one stage (no residual codebooks), K <= 256 (codes up to 8 bits), any vec_len, output groups, outliers,
permutation, scale and bias (the last four applied in torch around the matmul). Others use the LUT GEMM.
The dense weight lives only in a per-thread scratch buffer of at most TILE_BYTES, one tile of rows at a time
(so a 4096 x 4096 layer never has more than 8 MB of it dense): nothing dense is kept between calls.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import llvm_codebook as lk
from . import llvm_common as lc
from .codebook_gemm import unpack_codes

ir = lc.ir
(D_IDX, D_CB, D_W, D_NVEC, D_RPG, D_K, D_ROW0) = range(7)
N_ARGS = 7
TILE_BYTES = 8 << 20  # dense scratch per call: rows are dequantized and multiplied in tiles of at most this
_WIDTH = {torch.bfloat16: 16, torch.float32: 32}


@functools.cache
def host_ok() -> bool:
    """oneDNN bf16 matmul on this host (x86 with AVX-512 BF16 / AMX; elsewhere bf16 matmul is emulated, slow)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _gen(mod, v: int, width: int):
    """dq_work(args, tid, r0, r1): W[r][j*v:(j+1)*v] = cb[group(row0 + r)][idx[row0 + r][j]] (the codewords' bit
    patterns as i16 / i32, so the copy is exact)."""
    fn = ir.Function(mod, lc.WORK_TYPE, "dq_work")
    g = lc.Gen(fn)
    b = g.b
    args, _, r0, r1 = fn.args
    arg = lambda i, t=lc.PTR: g.arg(args, i, t)  # noqa: E731
    i64 = g.i64
    et = ir.IntType(width)
    idx, cb, w = arg(D_IDX), arg(D_CB), arg(D_W)
    n_vec, rpg, K, row0 = arg(D_NVEC, lc.I64), arg(D_RPG, lc.I64), arg(D_K, lc.I64), arg(D_ROW0, lc.I64)
    vt = ir.VectorType(et, v)
    with g.loop(r0, r1, name="r") as r:
        ra = b.add(r, row0)
        cbg = b.gep(cb, [b.mul(b.mul(b.sdiv(ra, rpg), K), i64(v))], source_etype=et)
        src = b.gep(idx, [b.mul(ra, n_vec)], source_etype=lc.I8)
        dst = b.gep(w, [b.mul(b.mul(r, n_vec), i64(v))], source_etype=et)
        with g.loop(0, n_vec, name="j") as j:
            c = b.zext(b.load(b.gep(src, [j], source_etype=lc.I8), typ=lc.I8), lc.I64)
            val = b.load(b.gep(cbg, [b.mul(c, i64(v))], source_etype=et), typ=vt, align=width // 8)
            b.store(val, b.gep(dst, [b.mul(j, i64(v))], source_etype=et), align=width // 8)
    b.ret_void()
    return fn


@functools.cache
def compiled(v: int, width: int = 16):
    mod = lc.new_module(f"dequant_{width}_{v}")
    lc.add_parallel_for(mod, _gen(mod, v, width))
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(
        lc.jit(mod, ["dq_work_par"])["dq_work_par"])


@dataclass
class Packed:
    idx: torch.Tensor  # uint8 [out, n_vec]
    cb: torch.Tensor  # bf16 or float32 [G, K, v]: the dense weight's dtype
    base: lk.Packed  # the validated float32-kernel pack: perm, outliers, scale, bias and the sizes


def pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits,
                base: lk.Packed | None = None, dtype: torch.dtype = torch.bfloat16) -> Packed | None:
    """The dequantizing kernel's form of one weight in `dtype` (bfloat16 or float32), or None for formats it does
    not take (see the docstring). `base`: this weight's `llvm_codebook.pack_weight` (it checks the shapes and code
    ranges), if already made."""
    if dtype not in _WIDTH:
        raise ValueError(f"dtype {dtype} is not one the dequantizing kernel writes: use one of {list(_WIDTH)}")
    base = base or lk.pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)
    if base is None or codes.shape[0] != 1 or codebooks.shape[2] > 256 or code_bits > 8:
        return None
    idx = unpack_codes(codes[0], code_bits, base.n_vec).to(torch.uint8).contiguous()
    return Packed(idx, codebooks[0].detach().to(dtype).contiguous(), base)


def tile_rows(p: Packed) -> int:
    """Rows dequantized per tile: all of them when the dense weight fits TILE_BYTES, else a multiple of 64."""
    q = p.base
    row_bytes = q.n_vec * q.spec.vec_len * p.cb.element_size()
    rows = max(1, TILE_BYTES // row_bytes)
    return q.out_f if rows >= q.out_f else max(64, rows // 64 * 64)


def dequantize(p: Packed, n_threads: int | None = None, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows [r0, r1) of the dense weight [r1 - r0, n_vec * v] in the pack's dtype (a view of this thread's
    scratch buffer: valid until the next kernel call on this thread)."""
    q = p.base
    r1 = q.out_f if r1 is None else r1
    cols, es = q.n_vec * q.spec.vec_len, p.cb.element_size()
    n = (r1 - r0) * cols * es
    buf = lc.scratch(n + 64)
    off = -buf.data_ptr() % 64
    w = buf[off:off + n].view(p.cb.dtype).view(r1 - r0, cols)
    a = (ctypes.c_int64 * N_ARGS)()
    a[D_IDX], a[D_CB], a[D_W] = p.idx.data_ptr(), p.cb.data_ptr(), w.data_ptr()
    a[D_NVEC], a[D_RPG], a[D_K], a[D_ROW0] = q.n_vec, q.out_f // q.groups, p.cb.shape[1], r0
    nt = torch.get_num_threads() if n_threads is None else n_threads
    compiled(q.spec.vec_len, _WIDTH[p.cb.dtype])(ctypes.addressof(a), r1 - r0, max(1, min(nt, r1 - r0)))
    return w


def gemm(p: Packed, x2: torch.Tensor, n_threads: int | None = None) -> torch.Tensor:
    """Inputs x2 [B, in] (float32) -> y [B, out] (float32), one tile of dequantized rows at a time."""
    q = p.base
    xp = x2.index_select(1, q.perm) if q.perm is not None else x2
    xq = xp[:, q.n_out:]
    pad = q.n_vec * q.spec.vec_len - xq.shape[1]
    xb = torch.nn.functional.pad(xq, (0, pad)) if pad else xq
    xb = xb.to(p.cb.dtype)
    step = tile_rows(p)
    if step >= q.out_f:
        y = torch.nn.functional.linear(xb, dequantize(p, n_threads))
    else:  # y^T row tiles are contiguous: each tile's product lands in place
        yt = torch.empty(q.out_f, xb.shape[0], dtype=p.cb.dtype)
        for r0 in range(0, q.out_f, step):
            r1 = min(q.out_f, r0 + step)
            torch.mm(dequantize(p, n_threads, r0, r1), xb.T, out=yt[r0:r1])
        y = yt.T
    return lk.finish(q, y.float(), xp)
