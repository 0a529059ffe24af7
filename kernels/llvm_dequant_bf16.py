"""Prefill (batch > 1) codebook GEMM by dequantization: codes -> a bf16 weight tile in scratch memory
(llvmlite-generated, multi-threaded over rows), then one bf16 matmul through oneDNN (AMX or AVX-512 BF16 on x86
hosts that have them) with float32 accumulation.

Opt-in (EDGETK_PREFILL=bf16, see `llvm_codebook.prefill_mode`): x and the codewords are rounded to bf16 (8-bit
mantissa), so the result is ~50 dB SNR from the reference (tested >= 40 dB), like the int8 LUT at batch 1. The
default prefill path stays the float32 LUT GEMM, which matches exported graphs to ~1e-6.

Why: at 64 tokens a LUT GEMM builds n_vec * K * v * tokens products (the whole LUT, per token) however few rows the
layer has, and a 576-row layer then costs more than the dense fp32 product. Dequantizing costs one codeword copy per
code and the dense bf16 product runs at the matrix units' rate.

Formats: one stage (no residual codebooks), K <= 256 (codes up to 8 bits), any vec_len, output groups, outliers,
permutation, scale and bias (the last four applied in torch around the matmul). Others use the LUT GEMM.
The dense weight lives only in a per-thread scratch buffer for the duration of the call (out * n_vec * v * 2 bytes;
32 MB for a 4096 x 4096 layer): nothing dense is kept between calls.
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
(D_IDX, D_CB, D_W, D_NVEC, D_RPG, D_K) = range(6)
N_ARGS = 6


@functools.cache
def host_ok() -> bool:
    """oneDNN bf16 matmul on this host (x86 with AVX-512 BF16 / AMX; elsewhere bf16 matmul is emulated, slow)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _gen(mod, v: int):
    """dq_work(args, tid, r0, r1): W[r][j*v:(j+1)*v] = cb[group(r)][idx[r][j]] (bf16 bit patterns as i16)."""
    fn = ir.Function(mod, lc.WORK_TYPE, "dq_work")
    g = lc.Gen(fn)
    b = g.b
    args, _, r0, r1 = fn.args
    arg = lambda i, t=lc.PTR: g.arg(args, i, t)  # noqa: E731
    i64 = g.i64
    idx, cb, w = arg(D_IDX), arg(D_CB), arg(D_W)
    n_vec, rpg, K = arg(D_NVEC, lc.I64), arg(D_RPG, lc.I64), arg(D_K, lc.I64)
    vt = ir.VectorType(lc.I16, v)
    with g.loop(r0, r1, name="r") as r:
        cbg = b.gep(cb, [b.mul(b.mul(b.sdiv(r, rpg), K), i64(v))], source_etype=lc.I16)
        src = b.gep(idx, [b.mul(r, n_vec)], source_etype=lc.I8)
        dst = b.gep(w, [b.mul(b.mul(r, n_vec), i64(v))], source_etype=lc.I16)
        with g.loop(0, n_vec, name="j") as j:
            c = b.zext(b.load(b.gep(src, [j], source_etype=lc.I8), typ=lc.I8), lc.I64)
            val = b.load(b.gep(cbg, [b.mul(c, i64(v))], source_etype=lc.I16), typ=vt, align=2)
            b.store(val, b.gep(dst, [b.mul(j, i64(v))], source_etype=lc.I16), align=2)
    b.ret_void()
    return fn


@functools.cache
def compiled(v: int):
    mod = lc.new_module(f"dequant_bf16_{v}")
    lc.add_parallel_for(mod, _gen(mod, v))
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(
        lc.jit(mod, ["dq_work_par"])["dq_work_par"])


@dataclass
class Packed:
    idx: torch.Tensor  # uint8 [out, n_vec]
    cb: torch.Tensor  # bf16 [G, K, v]
    base: lk.Packed  # the validated float32-kernel pack: perm, outliers, scale, bias and the sizes


def pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits,
                base: lk.Packed | None = None) -> Packed | None:
    """The dequantizing kernel's form of one weight, or None for formats it does not take (see the docstring).
    `base`: this weight's `llvm_codebook.pack_weight` (it checks the shapes and code ranges), if already made."""
    base = base or lk.pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)
    if base is None or codes.shape[0] != 1 or codebooks.shape[2] > 256 or code_bits > 8:
        return None
    idx = unpack_codes(codes[0], code_bits, base.n_vec).to(torch.uint8).contiguous()
    return Packed(idx, codebooks[0].detach().to(torch.bfloat16).contiguous(), base)


def dequantize(p: Packed, n_threads: int | None = None) -> torch.Tensor:
    """The bf16 weight [out, n_vec * v] (a view of this thread's scratch buffer: valid until the next kernel call
    on this thread)."""
    q = p.base
    cols = q.n_vec * q.spec.vec_len
    buf = lc.scratch(2 * q.out_f * cols + 64)
    off = -buf.data_ptr() % 64
    w = buf[off:off + 2 * q.out_f * cols].view(torch.bfloat16).view(q.out_f, cols)
    a = (ctypes.c_int64 * N_ARGS)()
    a[D_IDX], a[D_CB], a[D_W] = p.idx.data_ptr(), p.cb.data_ptr(), w.data_ptr()
    a[D_NVEC], a[D_RPG], a[D_K] = q.n_vec, q.out_f // q.groups, p.cb.shape[1]
    nt = torch.get_num_threads() if n_threads is None else n_threads
    compiled(q.spec.vec_len)(ctypes.addressof(a), q.out_f, max(1, min(nt, q.out_f)))
    return w


def gemm(p: Packed, x2: torch.Tensor, n_threads: int | None = None) -> torch.Tensor:
    """Inputs x2 [B, in] (float32) -> y [B, out] (float32)."""
    q = p.base
    xp = x2.index_select(1, q.perm) if q.perm is not None else x2
    xq = xp[:, q.n_out:]
    pad = q.n_vec * q.spec.vec_len - xq.shape[1]
    xb = torch.nn.functional.pad(xq, (0, pad)) if pad else xq
    return lk.finish(q, torch.nn.functional.linear(xb.to(torch.bfloat16), dequantize(p, n_threads)).float(), xp)
