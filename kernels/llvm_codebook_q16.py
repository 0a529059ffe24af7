"""Batch-1 codebook GEMV with an int16 lookup table held in registers (x86 AVX-512BW; llvmlite-generated).

The generic gemv of `llvm_codebook` fetches every LUT entry with a gather (one load per code). This variant
quantises the LUT of each column block of JB code vectors to int16 with one scale per block (|q| <= QMAX =
32767, so |error| <= scale/2 = max|LUT|/65534 per entry), keeps the 256 entries of column j in 8 zmm registers
and looks up 32 output rows at once with four `vpermi2w` (64-entry permutes) + two selects on code bits 6 and
7, accumulating in int32; per block y += float(acc) * scale.
Memory-bound instead of load-port-bound. Only for K == 256 (8-bit codes), any vec_len, stages, and groups
whose rows are a multiple of 32. aarch64 keeps the generic kernel (a NEON `tbl` variant is the next step).

Repacked code layout (one-time per weight, cached): ``codes_q[s][j][rb][i]`` (uint8) = code of output row
rb*32 + i for code vector j of stage s (rows padded to a multiple of 32 with code 0), so a range of columns is one
contiguous stream. Threads split the (stage, column block) items (split-K, like llvm_codebook_q8): each builds only
its blocks' LUTs into its own partial y, summed on the caller's thread before the epilogue.
"""
from __future__ import annotations

import functools
import math

import torch

from . import llvm_codebook as lk
from . import llvm_common as lc
from .codebook_gemm import unpack_codes

ir = lc.ir
R = 32
K = 256
JB = 32
QMAX = 32767  # int16 LUT range


@functools.cache
def host_ok() -> bool:
    lc._init()
    f = lc.llvm.get_host_cpu_features()
    return bool(f.get("avx512bw")) and lc.llvm.get_process_triple().startswith("x86_64")


def _vec(n, t=lc.F32):
    return ir.VectorType(t, n)


def _intrinsic(mod, name, ret, args):
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)


def _slot(g: lc.Gen, a, spec: lk.KernelSpec, tid):
    """Range tid's scratch: partial y (range 0 writes y itself), float LUT, int16 LUT, int32 accumulators, x."""
    b, i64 = g.b, g.i64
    n_rb = a.n(lk.A_NRB)
    part = b.gep(a.p(lk.A_SCR), [b.mul(tid, a.n(lk.A_SSTRIDE))], source_etype=lc.I8)  # f32 [n_rb*R]
    lut = b.gep(part, [b.mul(n_rb, i64(R))], source_etype=lc.F32)  # f32 [JB][K]
    lutq = b.gep(lut, [i64(JB * K)], source_etype=lc.F32)  # i16 [JB][K]
    acc = b.gep(lutq, [i64(JB * K)], source_etype=lc.I16)  # i32 [n_rb*R]
    xq = b.gep(acc, [b.mul(n_rb, i64(R))], source_etype=lc.I32)
    xo = b.gep(xq, [b.mul(a.n(lk.A_NVEC), i64(spec.vec_len))], source_etype=lc.F32)
    return part, lut, lutq, acc, xq, xo


def _gen(mod, spec: lk.KernelSpec):
    """q16_items(args, tid, i0, i1): (stage, column block) items [i0, i1), every row, into range tid's partial y
    (split-K, as in llvm_codebook_q8: each thread builds only its blocks' LUTs and streams its own columns)."""
    fn = ir.Function(mod, lc.WORK_TYPE, "q16_items")
    g = lc.Gen(fn)
    b = g.b
    args, tid, i0, i1 = fn.args
    a = lk._Args(g, args)
    i64 = g.i64
    n_vec, n_rb, G = a.n(lk.A_NVEC), a.n(lk.A_NRB), a.n(lk.A_GROUPS)
    n_blk = lk.split_k_items(g, a, spec)[0]
    part, lut, lutq, acc, xq, xo = _slot(g, a, spec, tid)
    y = b.select(b.icmp_signed("==", tid, i64(0)), a.p(lk.A_Y), part)
    with g.loop(0, b.mul(n_rb, i64(R)), name="z") as r:
        g.store(lc.F32, ir.Constant(lc.F32, 0.0), y, r)
    lk._emit_prep_x(g, a, spec, xq, xo)
    with g.loop(i0, i1, name="it") as it:
        st, j0 = b.sdiv(it, n_blk), b.mul(b.srem(it, n_blk), i64(JB))
        jl = g.min(i64(JB), b.sub(n_vec, j0))
        with g.loop(0, G, name="grp") as grp:
            cb_sg = b.gep(a.p(lk.A_CBT), [b.mul(b.add(b.mul(st, G), grp), i64(spec.vec_len * K))],
                          source_etype=lc.F32)
            lo, hi = lk._group_rows(g, a, spec, grp, i64(0), n_rb)
            _emit_block(g, a, spec, st, cb_sg, lut, lutq, acc, xq, j0, jl, lo, hi, y)
    b.ret_void()
    return fn


def _emit_block(g, a, spec, s, cb_sg, lut, lutq, acc, xq, j0, jl, lo, hi, y):
    b, i64, v = g.b, g.i64, spec.vec_len
    W = 16
    vw = _vec(W)
    with g.loop(0, jl, name="lj") as jj:
        xs = [g.splat(g.load(lc.F32, xq, b.add(b.mul(b.add(j0, jj), i64(v)), i64(t))), W) for t in range(v)]
        lk._lut_loop(g, cb_sg, lut, b.mul(jj, i64(K)), xs, 0, K, W, 1, v, K)
    # one scale per block: max |lut|
    mx = g.var(vw, init=ir.Constant(vw, [0.0] * W), name="mx")
    fabs = _intrinsic(g.fn.module, f"llvm.fabs.v{W}f32", vw, [vw])
    n_el = b.mul(jl, i64(K))
    with g.loop(0, n_el, step=W, name="mq") as i:
        x = b.call(fabs, [b.load(b.gep(lut, [i], source_etype=lc.F32), typ=vw, align=4)])
        b.store(g.fmax(x, b.load(mx, typ=vw)), mx)
    m = g.hmax(b.load(mx, typ=vw))
    scale = b.fmul(m, ir.Constant(lc.F32, 1.0 / QMAX))
    inv = b.select(b.fcmp_ordered(">", m, ir.Constant(lc.F32, 0.0)),
                   b.fdiv(ir.Constant(lc.F32, float(QMAX)), m), ir.Constant(lc.F32, 0.0))
    rint = _intrinsic(g.fn.module, f"llvm.rint.v{W}f32", vw, [vw])
    with g.loop(0, n_el, step=W, name="qz") as i:
        x = b.fmul(b.load(b.gep(lut, [i], source_etype=lc.F32), typ=vw, align=4), g.splat(inv, W))
        q = b.fptosi(b.call(rint, [x]), _vec(W, lc.I16))
        b.store(q, b.gep(lutq, [i], source_etype=lc.I16), align=2)
    vi = _vec(R, lc.I32)
    with g.loop(b.mul(lo, i64(R)), b.mul(hi, i64(R)), step=R, name="za") as r:
        b.store(ir.Constant(vi, [0] * R), b.gep(acc, [r], source_etype=lc.I32), align=4)
    _emit_lookup(g, a, s, lutq, acc, j0, jl, lo, hi)
    vf = _vec(R)
    with g.loop(b.mul(lo, i64(R)), b.mul(hi, i64(R)), step=R, name="ya") as r:
        yp = b.gep(y, [r], source_etype=lc.F32)
        t = b.sitofp(b.load(b.gep(acc, [r], source_etype=lc.I32), typ=vi, align=4), vf)
        b.store(g.fma(t, g.splat(scale, R), b.load(yp, typ=vf, align=4)), yp, align=4)


def _emit_lookup(g, a, s, lutq, acc, j0, jl, lo, hi):
    """acc[rows] += LUTq[j][code] for the block's columns, one column per pass.

    (Two columns per pass with an int16 pair sum ran 1.7x slower when cycling 256 MB of weights: two code
    streams per row tile.)
    """
    b, i64 = g.b, g.i64
    v16 = _vec(R, lc.I16)
    perm = _intrinsic(g.fn.module, "llvm.x86.avx512.vpermi2var.hi.512", v16, [v16, v16, v16])
    n_rb = a.n(lk.A_NRB)
    codes = a.p(lk.A_CODES)
    c64, c128, zero = ir.Constant(v16, [64] * R), ir.Constant(v16, [128] * R), ir.Constant(v16, [0] * R)
    vi = _vec(R, lc.I32)

    def tables(jj):
        tp = b.gep(lutq, [b.mul(jj, i64(K))], source_etype=lc.I16)
        return [b.load(b.gep(tp, [i64(32 * t)], source_etype=lc.I16), typ=v16, align=2) for t in range(8)]

    def look(tabs, jj, rb):
        row0 = b.mul(b.add(b.mul(s, a.n(lk.A_NVEC)), b.add(j0, jj)), b.mul(n_rb, i64(R)))
        cp = b.gep(codes, [b.add(row0, b.mul(rb, i64(R)))], source_etype=lc.I8)
        ci = b.zext(b.load(cp, typ=_vec(R, lc.I8), align=1), v16)
        parts = [b.call(perm, [tabs[2 * t], ci, tabs[2 * t + 1]]) for t in range(4)]
        b6 = b.icmp_unsigned("!=", b.and_(ci, c64), zero)
        b7 = b.icmp_unsigned("!=", b.and_(ci, c128), zero)
        return b.select(b7, b.select(b6, parts[3], parts[2]), b.select(b6, parts[1], parts[0]))

    def accumulate(rb, val):
        ap = b.gep(acc, [b.mul(rb, i64(R))], source_etype=lc.I32)
        b.store(b.add(b.load(ap, typ=vi, align=4), b.sext(val, vi)), ap, align=4)

    with g.loop(0, jl, name="jj") as jj:
        ta = tables(jj)
        with g.loop(lo, hi, name="rb") as rb:
            accumulate(rb, look(ta, jj, rb))


def make_spec(vec_len: int, Kc: int, stages: int, rows_per_group: int, grouped: bool) -> lk.KernelSpec | None:
    if Kc != K or (grouped and rows_per_group % R) or not host_ok():
        return None
    return lk.KernelSpec(vec_len, K, 1, R, JB, stages, 16, 1)


def build_module(spec: lk.KernelSpec, triple: str | None = None):
    mod = lc.new_module(f"codebook_q16_{spec.vec_len}", triple)

    def part_xo(g, a, t):
        sl = _slot(g, a, spec, t)
        return sl[0], sl[5]

    lk.emit_split_k_top(mod, spec, lc.add_parallel_for(mod, _gen(mod, spec)), "q16_work_par", part_xo)
    return mod


@functools.cache
def compiled(spec: lk.KernelSpec):
    return lk._PAR_T(lc.jit(build_module(spec), ["q16_work_par"])["q16_work_par"])


def repack_codes(codes: torch.Tensor, code_bits: int, n_vec: int) -> torch.Tensor:
    idx = unpack_codes(codes, code_bits, n_vec)  # [S, out, n_vec]
    S, out = idx.shape[:2]
    n_rb = math.ceil(out / R)
    idx = torch.nn.functional.pad(idx, (0, 0, 0, n_rb * R - out))
    return idx.permute(0, 2, 1).to(torch.uint8).contiguous()  # [S, n_vec, n_rb*R]


def pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits) -> lk.Packed | None:
    stages, out_f, _ = codes.shape
    groups, Kc = codebooks.shape[1], codebooks.shape[2]
    spec = make_spec(vec_len, Kc, stages, out_f // groups, groups > 1)
    base = lk.pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)
    if spec is None or base is None:
        return None
    return lk.Packed(spec, repack_codes(codes, code_bits, base.n_vec), base.cbt, base.perm, base.ow, base.scale,
                     base.bias, out_f, in_features, base.n_out, base.n_vec, groups, math.ceil(out_f / R))


def stride(p: lk.Packed, n_threads: int = 1) -> int:
    """Scratch bytes per thread (any thread count)."""
    n = 4 * p.n_rb * R + JB * K * 4 + JB * K * 2 + p.n_rb * R * 4 + 4 * (p.n_vec * p.spec.vec_len + p.n_out) + 64
    return n + (-n % 64)


def gemv(p: lk.Packed, x: torch.Tensor, n_threads: int | None = None, lead: tuple = ()) -> torch.Tensor:
    return lk.launch(p, lk.gemv_fn(p, compiled), x, stride, n_threads, lead)
