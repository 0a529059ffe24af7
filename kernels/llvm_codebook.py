"""llvmlite-generated CPU kernels for `edgetk::codebook_gemm` (contract: kernels/codebook_gemm.py).

Two kernels are generated per `KernelSpec` (vec_len, codebook size K, code width, row tile R, column block JB,
stages, batch tile BT), JIT-compiled once for the host (AVX2 / AVX-512 from the host CPU features, NEON on
aarch64) and cached; the same generator emits aarch64 objects (kernels/aarch64_check):

* `gemv` (one input vector): per column block of JB code vectors, a lookup table
  LUT[s][jj][k] = <x_j, codebook[s, g, k]> (JB*K floats, sized to stay in L1), then per tile of R output rows a
  gather-and-sum: the R codes of column j are one `<R x i8|i16>` load, `llvm.masked.gather` fetches R LUT
  entries (vpgatherdd on x86) and adds them to an `<R x float>` accumulator. On AVX-512 hosts with K <= 256 the
  R = 16 entries are picked with permutes instead (`_permute_lookup`: `vpermi2ps` per 32 entries of the column's
  LUT row, then a blend tree on the codes' bits 5-7, which LLVM folds into masked permutes): the same float32
  sums, 1.2-1.7x the gather's speed on a Zen 5. The epilogue adds the dense outlier columns, multiplies by the
  per-row scale and adds the bias.
* `gemm` (prefill, B > 1 inputs): the batch is cut into tiles of BT inputs; LUT[s][jj][k][0:BT] holds the
  dot products for all BT inputs, so the gather-and-sum becomes contiguous `<BT x float>` loads and adds
  (no gathers), 4 output rows at a time.

Both split output-row tiles over the threads (`llvm_common.add_parallel_for`: libgomp's team on the host,
pthreads on cross targets); the prefill GEMM splits its batch tiles instead when there are at least as many as
threads (`gemmb`), so that no thread rebuilds another's LUTs (what dominates on layers with few rows). The
batch-1 LUT kernels (q8, q16) split the column blocks instead (split-K, `emit_split_k_top`), so that each thread
builds only its own LUTs and streams one contiguous range of codes; so does the float32 gemv on 2+ threads where a
column's LUT is not trivial (`gemvk`, K * vec_len >= SPLIT_K_MIN_LUT: the n_vec code columns cut evenly, a range's
first and last JB blocks built and looked up over their part only; each range sums into its own partial y, the
first into y).
Batch 2..12 (speculative-decoding verify trees, short chunks) goes to `llvm_codebook_few` under
"auto" (codewords decoded in registers, no LUT). More goes to the same module's panel GEMM (each row tile decoded
once into a float32 tile in L1, shared by tiles of 6 inputs) or to `llvm_dequant` (dequantize a tile + oneDNN
matmul) instead where `prefill_choice` finds it cheaper (layers with few rows: float32) or the caller allowed bf16
(EDGETK_PREFILL=bf16, or `torch.set_float32_matmul_precision("medium")` under the default "auto"), and to
`llvm_gemm_i8` (int8 codewords x int8 activations) where the caller asked for it (EDGETK_PREFILL=int8).

Repacked code layout (one-time per weight tensor, cached; the stored layout is never changed):
``codes_r[s][jblk][rb][jj][i]`` (uint8 when K <= 256, else uint16) is the code of output row rb*R + i for code
vector j = jblk*JB + jj of stage s; a column block holds jl = min(JB, n_vec - jblk*JB) vectors, so the flat offset
is ``s*n_rb*R*n_vec + jblk*JB*n_rb*R + rb*jl*R + jj*R + i``. Rows are padded to n_rb*R with code 0 (their outputs
are dropped). A thread therefore streams its rows' codes sequentially within every column block. Codebooks are
repacked to float32 ``cbT[s][g][t][k]`` (codeword k, component t) so the LUT is built with unit-stride vectors.
Formats it does not take (non-float32 activations, more than 65536 codewords, malformed tensors) go to
`codebook_gemm_reference`. Kernel table entries: "llvm" (priority 10: batch 1 uses the first LUT kernel of
`default_lut()` that the host and format allow, else the float32 kernels; by default none: the float32 kernel,
equal to the reference up to summation order, which on the session-10 Xeon (AVX-512 VBMI) was also 1.09-1.35x
faster than the int16 LUT of `llvm_codebook_q16` (AVX-512BW, K == 256; ~1e-5 of the output range from the
reference; EDGETK_LUT=q16 opts into it); EDGETK_LUT=q8 puts the int8 LUT of `llvm_codebook_q8` (AVX-512 VBMI,
AVX2 or NEON, K <= 256; ~38 dB SNR, like int8 activations; 3.6x faster than the float32 kernel on a 4096x4096
layer there; on AVX2 1.8-3.3x (K = 256, session 21) and 3.5-15x (K <= 16, nibble codes) faster) first), "llvm-f32"
(priority 5: the float32 kernels only, equal to the reference up to summation order) and "llvm-q8" / "llvm-q16" (priority 4: batch 1 through that LUT kernel first, for tests and
benchmarks).
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading
import weakref
from dataclasses import dataclass

import torch

from edgetk.errors import ConfigError

from . import llvm_common as lc
from . import table
from .codebook_gemm import codebook_gemm_reference, unpack_codes

_get_ident = threading.get_ident

ir = lc.ir
# indices into the i64 argument block every generated kernel receives
(A_X, A_PERM, A_CODES, A_CBT, A_OW, A_SCALE, A_BIAS, A_Y, A_SCR, A_SSTRIDE, A_OUT, A_NOUT, A_NVEC, A_GROUPS,
 A_RPG, A_NRB, A_NBT, A_IN_F, A_ROWS) = range(19)
N_ARGS = 19
LUT_BYTES = 32 << 10  # gemv LUT block budget (L1)
GEMM_LUT_BYTES = 64 << 10  # prefill LUT sub-block budget
# gemv on AVX-512 hosts, K <= 256: LUT entries picked with permutes (`_permute_lookup`) instead of a gather
# (measured on a Zen 5, smollm2's shapes and 4096^2: 1.2-1.7x the gather at 1 thread, 1.0-1.6x at 2); one row
# tile per pass (2 and 4 tiles sharing each column's table loads, session 26: no faster but for 4096^2 on one thread)
GEMV_PERMUTE = True
# 2+ threads: the batch-1 float32 gemv splits the code columns over the threads (`gemvk`, each thread builds only its
# columns' LUT; partial outputs summed) instead of the row tiles (`gemv`, every thread built the whole LUT) where a
# column's LUT has K * vec_len >= SPLIT_K_MIN_LUT products (session 28, Zen 5, 2 threads, interleaved in one process,
# smollm2 shapes: K 256 v 4 1.06-1.19x faster, also 4096^2; K 64 v 2 (vq3) 1.09-1.31x; K 512 v 3 (vq3-k512)
# 1.33-1.71x; 2 stages of K 256 v 8 (vq2-res) 1.11-1.26x; but 2 stages of K 16 v 4 (vq2-r16, a 16-entry table)
# 0.76-1.01x: there the rows keep it); False: row tiles everywhere
GEMV_SPLIT_K = True
SPLIT_K_MIN_LUT = 128
MIN_CODES_PER_THREAD = 1 << 13  # below this another thread costs more than it saves (session 18: at 2 threads every
# smollm2 shape, 192x576 included, ran faster on two, q8 / q16 / float32 kernels alike, cycling 256 MB of weights)


@dataclass(frozen=True)
class KernelSpec:
    vec_len: int
    K: int
    code_bytes: int  # 1 (K <= 256) or 2
    R: int  # output rows per tile (vector width of the gemv gather)
    JB: int  # code vectors per column block
    stages: int
    BT: int  # batch tile of the prefill kernel
    JS: int  # code vectors per prefill LUT sub-block (divides JB)
    nibbles: bool = False  # llvm_codebook_q8, K <= 16: two 4-bit codes per byte (columns 2p, 2p+1 of a tile)
    int_lut: bool = False  # llvm_codebook_q8: the LUT built from int8 x and codebooks (vpdpbusd / sdot)

    @property
    def ctype(self):
        return lc.I8 if self.code_bytes == 1 else lc.I16


def make_spec(vec_len: int, K: int, stages: int, rows_per_group: int, grouped: bool,
              vector_bits: int | None = None) -> KernelSpec | None:
    lanes = (vector_bits or lc.host_vector_bits()) // 32
    R = lanes
    while grouped and R > 1 and rows_per_group % R:
        R //= 2
    if K > 65536:
        return None
    JB = max(1, LUT_BYTES // (4 * stages * K))
    JS = max(1, min(JB, GEMM_LUT_BYTES // (4 * stages * K * lanes)))
    while JB % JS:
        JS -= 1
    return KernelSpec(vec_len, K, 1 if K <= 256 else 2, R, JB, stages, lanes, JS)


# -- IR generation ---------------------------------------------------------------------------------------
class _Args:
    def __init__(self, g: lc.Gen, args):
        self.g, self.args = g, args

    def p(self, i):
        return self.g.arg(self.args, i)

    def n(self, i):
        return self.g.arg(self.args, i, lc.I64)


def _group_rows(g: lc.Gen, a: _Args, spec: KernelSpec, grp, rb0, rb1):
    """Row tiles of group `grp` inside [rb0, rb1)."""
    b, R = g.b, g.i64(spec.R)
    rpg = a.n(A_RPG)
    lo = b.sdiv(b.mul(grp, rpg), R)
    hi = b.sdiv(b.add(b.mul(b.add(grp, g.i64(1)), rpg), g.i64(spec.R - 1)), R)
    return g.max(lo, rb0), g.min(hi, rb1)


def split_k_items(g: lc.Gen, a: _Args, spec: KernelSpec):
    """(stage, column block) work items of the split-K gemv kernels: S * ceil(n_vec / JB)."""
    n_blk = g.b.sdiv(g.b.add(a.n(A_NVEC), g.i64(spec.JB - 1)), g.i64(spec.JB))
    return n_blk, g.b.mul(g.i64(spec.stages), n_blk)


def emit_split_k_top(mod, spec: KernelSpec, par, name: str, slot, columns: bool = False) -> ir.Function:
    """`name`(args, n_rb, n_threads) of a split-K gemv kernel (q8, q16: its (stage, column block) items; the float32
    `gemvk`, `columns`: its n_vec code columns) on n_threads ranges through `par`, then y = the sum of the ranges'
    partial y (range 0 wrote y itself) and the epilogue (outliers, scale, bias). slot(g, a, t) -> (partial y,
    outlier x) pointers of range t."""
    fn = ir.Function(mod, ir.FunctionType(lc.VOID, [lc.PTR, lc.I64, lc.I64]), name)
    g = lc.Gen(fn)
    b = g.b
    args, _, nt = fn.args
    a = _Args(g, args)
    i64 = g.i64
    items = a.n(A_NVEC) if columns else split_k_items(g, a, spec)[1]
    nt = g.max(g.min(nt, items), i64(1))
    b.call(par, [args, items, nt])
    y, n = a.p(A_Y), b.mul(a.n(A_NRB), i64(spec.R))
    with g.loop(1, nt, name="t") as t:
        part = slot(g, a, t)[0]
        with b.if_then(b.icmp_signed("<", lc._ranges(g, items, nt, t)[0], items)):  # empty ranges never ran
            with g.loop(0, n, name="red") as r:
                g.store(lc.F32, b.fadd(g.load(lc.F32, y, r), g.load(lc.F32, part, r)), y, r)
    _emit_epilogue(g, a, spec, slot(g, a, i64(0))[1], i64(0), g.min(n, a.n(A_OUT)))
    b.ret_void()
    return fn


def _code_base(g: lc.Gen, a: _Args, spec: KernelSpec, s, j0, jl, rb, joff=None):
    """Codes of tile rb in the block of columns [j0, j0 + jl) of stage s, from the block's column joff on."""
    b, R = g.b, g.i64(spec.R)
    nrb_r = b.mul(a.n(A_NRB), R)
    off = b.add(b.mul(s, b.mul(nrb_r, a.n(A_NVEC))), b.mul(j0, nrb_r))
    off = b.add(off, b.mul(b.mul(rb, jl), R))
    if joff is not None:
        off = b.add(off, b.mul(joff, R))
    return b.gep(a.p(A_CODES), [off], source_etype=spec.ctype)


def _emit_lut(g: lc.Gen, a: _Args, spec: KernelSpec, lut, xsrc, grp, j0, jl, lanes: int):
    """lut[s][jj][k][0:lanes] = sum_t cbT[s][grp][t][k] * x[(j0+jj)*v + t][0:lanes].

    lanes == 1 (gemv): vectorised over k in chunks of W = spec.BT; lanes > 1 (gemm): vectorised over the batch.
    """
    b, v, K = g.b, spec.vec_len, spec.K
    cbt, G = a.p(A_CBT), a.n(A_GROUPS)
    W = spec.BT if lanes == 1 else 1
    with g.loop(0, spec.stages, name="ls") as s:
        cb_sg = b.gep(cbt, [b.mul(b.add(b.mul(s, G), grp), g.i64(v * K))], source_etype=lc.F32)
        with g.loop(0, jl, name="lj") as jj:
            xoff = b.mul(b.add(j0, jj), g.i64(v * lanes))
            xp = [b.gep(xsrc, [b.add(xoff, g.i64(t * lanes))], source_etype=lc.F32) for t in range(v)]
            row = b.mul(b.add(b.mul(s, g.i64(spec.JB if lanes == 1 else spec.JS)), jj), g.i64(K * lanes))
            if lanes == 1:
                xs1 = [b.load(p_, typ=lc.F32) for p_ in xp]
                for width, k0, k1 in ((W, 0, K - K % W), (1, K - K % W, K)):
                    if k1 > k0:
                        _lut_loop(g, cb_sg, lut, row, [g.splat(x_, width) for x_ in xs1], k0, k1, width, 1, v, K)
            else:
                vt = ir.VectorType(lc.F32, lanes)
                xs = [b.load(p_, typ=vt, align=4) for p_ in xp]
                _lut_loop(g, cb_sg, lut, row, xs, 0, K, 1, lanes, v, K)


def _lut_loop(g: lc.Gen, cb_sg, lut, row, xs, k0, k1, width, lanes, v, K):
    """For k in [k0, k1) step width: lut[row + k*lanes] = sum_t cb[t*K + k : +width] (*) xs[t]."""
    b = g.b
    n = max(width, lanes)
    vt = ir.VectorType(lc.F32, n)
    with g.loop(k0, k1, step=width, name="lk") as k:
        acc = ir.Constant(vt, [0.0] * n)
        for t in range(v):
            wp = b.gep(cb_sg, [b.add(k, g.i64(t * K))], source_etype=lc.F32)
            w = b.load(wp, typ=vt, align=4) if width > 1 else g.splat(b.load(wp, typ=lc.F32), n)
            acc = g.fma(w, xs[t], acc)
        b.store(acc, b.gep(lut, [b.add(row, b.mul(k, g.i64(lanes)))], source_etype=lc.F32), align=4)


def _emit_prep_x(g: lc.Gen, a: _Args, spec: KernelSpec, xq, xo):
    """xq[i] = x[perm[n_out + i]] (zero past in_q), xo[i] = x[perm[i]]; identity when perm is null."""
    b = g.b
    x, perm, n_out = a.p(A_X), a.n(A_PERM), a.n(A_NOUT)
    n_pad = b.mul(a.n(A_NVEC), g.i64(spec.vec_len))
    in_f = a.n(A_IN_F)
    has_perm = b.icmp_signed("!=", perm, g.i64(0))
    pp = b.inttoptr(perm, lc.PTR)
    with b.if_else(b.and_(b.not_(has_perm), b.icmp_signed("==", n_out, g.i64(0)))) as (plain, permuted):
        with plain:  # no permutation, no outliers: a vector copy, then the zero padding (was ~5 cycles an input)
            W = 16
            vt = ir.VectorType(lc.F32, W)
            n_w = b.mul(b.sdiv(in_f, g.i64(W)), g.i64(W))
            with g.loop(0, n_w, step=W, name="pv") as i:
                b.store(b.load(b.gep(x, [i], source_etype=lc.F32), typ=vt, align=4),
                        b.gep(xq, [i], source_etype=lc.F32), align=4)
            with g.loop(n_w, in_f, name="pt") as i:
                g.store(lc.F32, g.load(lc.F32, x, i), xq, i)
            with g.loop(in_f, n_pad, name="pz") as i:
                g.store(lc.F32, ir.Constant(lc.F32, 0.0), xq, i)
        with permuted:
            _emit_prep_x_permuted(g, x, pp, has_perm, n_pad, n_out, in_f, xq, xo)


def _emit_prep_x_permuted(g: lc.Gen, x, pp, has_perm, n_pad, n_out, in_f, xq, xo):
    b = g.b
    with g.loop(0, b.add(n_pad, n_out), name="px") as i:
        # loads only under branches (`load_or`): a select of them would read perm when it is null, x past its end
        last = g.min(i, b.sub(in_f, g.i64(1)))
        src = g.load_or(lc.I64, pp, last, last, has_perm)
        val = g.load_or(lc.F32, x, src, ir.Constant(lc.F32, 0.0), b.icmp_signed("<", i, in_f))
        is_out = b.icmp_signed("<", i, n_out)
        dst = b.select(is_out, b.gep(xo, [i], source_etype=lc.F32),
                       b.gep(xq, [b.sub(i, n_out)], source_etype=lc.F32))
        b.store(val, dst)


def _permute_lookup(g: lc.Gen, row, c, K: int):
    """<16 x float> row[c[i]] for 16 codes c (<16 x i32>, all < K <= 256) from a column's K LUT entries in L1,
    with AVX-512 permutes instead of a gather: `vpermi2ps` picks from each 32 entries by the codes' low 5 bits,
    then a blend tree on bits 5, 6, 7 picks the code's table (LLVM folds the blends into masked permutes). The
    last table may read up to 31 floats past the row's K entries (never picked): `gemv_stride` pads for them."""
    b, mod = g.b, g.fn.module
    vt, it = ir.VectorType(lc.F32, 16), ir.VectorType(lc.I32, 16)
    ld = lambda off: b.load(b.gep(row, [g.i64(off)], source_etype=lc.F32), typ=vt, align=4)  # noqa: E731
    if K <= 16:
        pv = mod.globals.get("llvm.x86.avx512.permvar.sf.512") or ir.Function(
            mod, ir.FunctionType(vt, [vt, it]), "llvm.x86.avx512.permvar.sf.512")
        return b.call(pv, [ld(0), c])
    p2 = mod.globals.get("llvm.x86.avx512.vpermi2var.ps.512") or ir.Function(
        mod, ir.FunctionType(vt, [vt, it, vt]), "llvm.x86.avx512.vpermi2var.ps.512")
    res = [b.call(p2, [ld(32 * t), c, ld(32 * t + 16)]) for t in range(-(-K // 32))]
    bit = 5
    while len(res) > 1:
        on = b.icmp_unsigned("!=", b.and_(c, ir.Constant(it, [1 << bit] * 16)), ir.Constant(it, [0] * 16))
        res = [b.select(on, res[i + 1], res[i]) if i + 1 < len(res) else res[i] for i in range(0, len(res), 2)]
        bit += 1
    return res[0]


def _emit_permute_tile(g: lc.Gen, a: _Args, spec: KernelSpec, lut, y, j0, jl, rb, joff=None, jn=None):
    """y[tile rb] += the block's LUT entries of its codes (`_permute_lookup`), every stage; joff, jn: only the
    block's columns [joff, joff + jn) (LUT rows 0..jn-1; default: the whole block)."""
    b, R, K = g.b, spec.R, spec.K
    vt, it = ir.VectorType(lc.F32, R), ir.VectorType(lc.I32, R)
    yp = b.gep(y, [b.mul(rb, g.i64(R))], source_etype=lc.F32)
    acc = g.var(vt, b.load(yp, typ=vt, align=4), name="pacc")
    with g.loop(0, spec.stages, name="ps") as s:
        cb = _code_base(g, a, spec, s, j0, jl, rb, joff)
        lb = b.gep(lut, [b.mul(s, g.i64(spec.JB * K))], source_etype=lc.F32)
        with g.loop(0, jl if jn is None else jn, name="pjj") as jj:
            row = b.gep(lb, [b.mul(jj, g.i64(K))], source_etype=lc.F32)
            c = b.load(b.gep(cb, [b.mul(jj, g.i64(R))], source_etype=spec.ctype), typ=ir.VectorType(spec.ctype, R),
                       align=1)
            b.store(b.fadd(b.load(acc, typ=vt), _permute_lookup(g, row, b.zext(c, it), K)), acc)
    b.store(b.load(acc, typ=vt), yp, align=4)


def _gen_gemv(mod, spec: KernelSpec, permute: bool = False):
    fn = ir.Function(mod, lc.WORK_TYPE, "gemv_work")
    g = lc.Gen(fn)
    b = g.b
    args, tid, rb0, rb1 = fn.args
    a = _Args(g, args)
    R, K, v = spec.R, spec.K, spec.vec_len
    vt = ir.VectorType(lc.F32, R)
    n_vec = a.n(A_NVEC)
    scr = b.gep(a.p(A_SCR), [b.mul(tid, a.n(A_SSTRIDE))], source_etype=lc.I8)
    lut = scr
    xq = b.gep(lut, [g.i64(spec.stages * spec.JB * K)], source_etype=lc.F32)
    xo = b.gep(xq, [b.mul(n_vec, g.i64(v))], source_etype=lc.F32)
    _emit_prep_x(g, a, spec, xq, xo)
    y = a.p(A_Y)
    with g.loop(b.mul(rb0, g.i64(R)), b.mul(rb1, g.i64(R)), name="z") as r:
        g.store(lc.F32, ir.Constant(lc.F32, 0.0), y, r)
    rpg = a.n(A_RPG)
    g0 = b.sdiv(b.mul(rb0, g.i64(R)), rpg)
    g1 = g.min(b.add(b.sdiv(b.sub(b.mul(rb1, g.i64(R)), g.i64(1)), rpg), g.i64(1)), a.n(A_GROUPS))
    acc_v = [g.var(vt, name=f"acc{u}") for u in range(2)]
    with g.loop(g0, g1, name="grp") as grp:
        lo, hi = _group_rows(g, a, spec, grp, rb0, rb1)
        with g.loop(0, n_vec, step=spec.JB, name="jb") as j0:
            jl = g.min(g.i64(spec.JB), b.sub(n_vec, j0))
            _emit_lut(g, a, spec, lut, xq, grp, j0, jl, 1)
            with g.loop(lo, hi, name="rb") as rb:
                if permute:
                    _emit_permute_tile(g, a, spec, lut, y, j0, jl, rb)
                else:
                    _emit_gather_tile(g, a, spec, lut, y, j0, jl, rb, acc_v)
    _emit_epilogue(g, a, spec, xo, b.mul(rb0, g.i64(R)), g.min(b.mul(rb1, g.i64(R)), a.n(A_OUT)))
    b.ret_void()
    return fn


def _emit_gather_tile(g: lc.Gen, a: _Args, spec: KernelSpec, lut, y, j0, jl, rb, acc_v, joff=None, jn=None):
    """y[tile rb] += the block's LUT entries of its codes (`llvm.masked.gather`, two accumulators), every stage;
    joff, jn: only the block's columns [joff, joff + jn) (LUT rows 0..jn-1; default: the whole block)."""
    b, R, K = g.b, spec.R, spec.K
    vt, it = ir.VectorType(lc.F32, R), ir.VectorType(lc.I32, R)
    n = jl if jn is None else jn
    yp = b.gep(y, [b.mul(rb, g.i64(R))], source_etype=lc.F32)
    b.store(b.load(yp, typ=vt, align=4), acc_v[0])
    b.store(ir.Constant(vt, [0.0] * R), acc_v[1])
    with g.loop(0, spec.stages, name="s") as s:
        cb = _code_base(g, a, spec, s, j0, jl, rb, joff)
        lb = b.gep(lut, [b.mul(s, g.i64(spec.JB * K))], source_etype=lc.F32)
        n2 = b.and_(n, g.i64(-2))

        def step(jj, u):
            c = b.load(b.gep(cb, [b.mul(jj, g.i64(R))], source_etype=spec.ctype),
                       typ=ir.VectorType(spec.ctype, R), align=1)
            idx = b.add(b.zext(c, it), g.splat(b.trunc(b.mul(jj, g.i64(K)), lc.I32), R))
            b.store(b.fadd(b.load(acc_v[u], typ=vt), g.gather(lb, idx, R)), acc_v[u])

        with g.loop(0, n2, step=2, name="jj") as jj:
            step(jj, 0)
            step(b.add(jj, g.i64(1)), 1)
        with b.if_then(b.icmp_signed("<", n2, n)):
            step(n2, 0)
    b.store(b.fadd(b.load(acc_v[0], typ=vt), b.load(acc_v[1], typ=vt)), yp, align=4)


def _gemvk_slot(g: lc.Gen, a: _Args, spec: KernelSpec, tid):
    """Range tid's scratch slot of the split-K gemv (layout: see `gemvk_stride`): (partial y, LUT, xq, xo)."""
    b = g.b
    base = b.gep(a.p(A_SCR), [b.mul(tid, a.n(A_SSTRIDE))], source_etype=lc.I8)
    lut = b.gep(base, [b.mul(a.n(A_NRB), g.i64(spec.R))], source_etype=lc.F32)
    xq = b.gep(lut, [g.i64(spec.stages * spec.JB * spec.K + 32)], source_etype=lc.F32)  # + the permute's over-read
    xo = b.gep(xq, [b.mul(a.n(A_NVEC), g.i64(spec.vec_len))], source_etype=lc.F32)
    return base, lut, xq, xo


def _gen_gemvk(mod, spec: KernelSpec, permute: bool = False):
    """gemvk_items(args, tid, c0, c1): the float32 gemv split over code columns (split-K) -- code columns [c0, c1)
    of every row into range tid's partial y (range 0: y itself). Each thread builds the LUT of its columns only:
    split by rows (`gemv_work`), every thread built the whole LUT, which dominates on layers with few rows and many
    inputs (576x1536 at 2 threads ran slower than at 1). Columns are cut evenly, so a range may start or end inside
    a JB block of the code layout: the block's sub-range [jlo, jhi) is built and looked up."""
    fn = ir.Function(mod, lc.WORK_TYPE, "gemvk_items")
    g = lc.Gen(fn)
    b = g.b
    args, tid, c0, c1 = fn.args
    a = _Args(g, args)
    R, JB = spec.R, spec.JB
    vt = ir.VectorType(lc.F32, R)
    part, lut, xq, xo = _gemvk_slot(g, a, spec, tid)
    y = b.select(b.icmp_signed("==", tid, g.i64(0)), a.p(A_Y), part)
    n_rb, n_vec = a.n(A_NRB), a.n(A_NVEC)
    with g.loop(0, b.mul(n_rb, g.i64(R)), name="z") as r:
        g.store(lc.F32, ir.Constant(lc.F32, 0.0), y, r)
    _emit_prep_x(g, a, spec, xq, xo)
    acc_v = [g.var(vt, name=f"acc{u}") for u in range(2)]
    blk1 = b.sdiv(b.add(c1, g.i64(JB - 1)), g.i64(JB))
    with g.loop(b.sdiv(c0, g.i64(JB)), blk1, name="kb") as blk:
        j0 = b.mul(blk, g.i64(JB))
        jl = g.min(g.i64(JB), b.sub(n_vec, j0))
        jlo, jhi = g.max(c0, j0), g.min(c1, b.add(j0, jl))
        joff, jn = b.sub(jlo, j0), b.sub(jhi, jlo)
        with g.loop(0, a.n(A_GROUPS), name="kg") as grp:
            lo, hi = _group_rows(g, a, spec, grp, g.i64(0), n_rb)
            _emit_lut(g, a, spec, lut, xq, grp, jlo, jn, 1)
            with g.loop(lo, hi, name="krb") as rb:
                if permute:
                    _emit_permute_tile(g, a, spec, lut, y, j0, jl, rb, joff, jn)
                else:
                    _emit_gather_tile(g, a, spec, lut, y, j0, jl, rb, acc_v, joff, jn)
    b.ret_void()
    return fn


def _emit_epilogue(g: lc.Gen, a: _Args, spec: KernelSpec, xo, r0, r1):
    """y[r] = (y[r] + <outlier_w[r], xo>) * scale[r] + bias[r] for rows [r0, r1)."""
    b = g.b
    y, n_out = a.p(A_Y), a.n(A_NOUT)
    ow, sc, bi = a.n(A_OW), a.n(A_SCALE), a.n(A_BIAS)
    acc = g.var(lc.F32, name="ep")
    with g.loop(r0, r1, name="er") as r:
        b.store(g.load(lc.F32, y, r), acc)
        with b.if_then(b.icmp_signed("!=", ow, g.i64(0))):
            owr = b.gep(b.inttoptr(ow, lc.PTR), [b.mul(r, n_out)], source_etype=lc.F32)
            with g.loop(0, n_out, name="eo") as i:
                b.store(g.fma(g.load(lc.F32, owr, i), g.load(lc.F32, xo, i), b.load(acc, typ=lc.F32)), acc)
        with b.if_then(b.icmp_signed("!=", sc, g.i64(0))):
            b.store(b.fmul(b.load(acc, typ=lc.F32), g.load(lc.F32, b.inttoptr(sc, lc.PTR), r)), acc)
        with b.if_then(b.icmp_signed("!=", bi, g.i64(0))):
            b.store(b.fadd(b.load(acc, typ=lc.F32), g.load(lc.F32, b.inttoptr(bi, lc.PTR), r)), acc)
        g.store(lc.F32, b.load(acc, typ=lc.F32), y, r)


def _gen_gemm(mod, spec: KernelSpec, split: str = "rows"):
    """Prefill: xt[bt][n_vec*v][BT] -> yt[bt][n_rb*R][BT] (VQ part only; epilogue in torch).

    split="rows" (`gemm_work`): a thread's items are row tiles, for every batch tile (each thread builds every LUT:
    few batch tiles); split="batch" (`gemmb_work`): a thread's items are batch tiles, every row (each LUT is built
    once, by the one thread that uses it: what layers with few rows need, where the LUT build dominates)."""
    fn = ir.Function(mod, lc.WORK_TYPE, "gemm_work" if split == "rows" else "gemmb_work")
    g = lc.Gen(fn)
    b = g.b
    args, tid, i0, i1 = fn.args
    a = _Args(g, args)
    if split == "rows":
        rb0, rb1, bt0, bt1 = i0, i1, g.i64(0), a.n(A_NBT)
    else:
        rb0, rb1, bt0, bt1 = g.i64(0), a.n(A_NRB), i0, i1
    R, K, BT, JS = spec.R, spec.K, spec.BT, spec.JS
    U = min(4, R)
    vt = ir.VectorType(lc.F32, BT)
    n_vec = a.n(A_NVEC)
    lut = b.gep(a.p(A_SCR), [b.mul(tid, a.n(A_SSTRIDE))], source_etype=lc.I8)
    out_pad = b.mul(a.n(A_NRB), g.i64(R))
    rpg = a.n(A_RPG)
    g0 = b.sdiv(b.mul(rb0, g.i64(R)), rpg)
    g1 = g.min(b.add(b.sdiv(b.sub(b.mul(rb1, g.i64(R)), g.i64(1)), rpg), g.i64(1)), a.n(A_GROUPS))
    accs = [g.var(vt, name=f"a{u}") for u in range(U)]
    with g.loop(bt0, bt1, name="bt") as bt:
        xb = b.gep(a.p(A_X), [b.mul(bt, b.mul(n_vec, g.i64(spec.vec_len * BT)))], source_etype=lc.F32)
        yb = b.gep(a.p(A_Y), [b.mul(bt, b.mul(out_pad, g.i64(BT)))], source_etype=lc.F32)
        with g.loop(b.mul(rb0, g.i64(R * BT)), b.mul(rb1, g.i64(R * BT)), name="z") as i:
            g.store(lc.F32, ir.Constant(lc.F32, 0.0), yb, i)
        with g.loop(g0, g1, name="grp") as grp:
            lo, hi = _group_rows(g, a, spec, grp, rb0, rb1)
            with g.loop(0, n_vec, step=spec.JB, name="jb") as j0:
                jl = g.min(g.i64(spec.JB), b.sub(n_vec, j0))
                with g.loop(0, jl, step=JS, name="js") as js:
                    jsl = g.min(g.i64(JS), b.sub(jl, js))
                    _emit_lut(g, a, spec, lut, xb, grp, b.add(j0, js), jsl, BT)
                    with g.loop(lo, hi, name="rb") as rb:
                        with g.loop(0, R, step=U, name="ru") as ru:
                            row = b.add(b.mul(rb, g.i64(R)), ru)
                            yps = [b.gep(yb, [b.mul(b.add(row, g.i64(u)), g.i64(BT))], source_etype=lc.F32)
                                   for u in range(U)]
                            for u in range(U):
                                b.store(b.load(yps[u], typ=vt, align=4), accs[u])
                            with g.loop(0, spec.stages, name="s") as s:
                                cb = b.gep(_code_base(g, a, spec, s, j0, jl, rb), [ru], source_etype=spec.ctype)
                                lb = b.gep(lut, [b.mul(s, g.i64(JS * K * BT))], source_etype=lc.F32)
                                with g.loop(0, jsl, name="jj") as jj:
                                    cj = b.gep(cb, [b.mul(b.add(js, jj), g.i64(R))], source_etype=spec.ctype)
                                    lj = b.gep(lb, [b.mul(jj, g.i64(K * BT))], source_etype=lc.F32)
                                    for u in range(U):
                                        c = b.zext(g.load(spec.ctype, cj, g.i64(u)), lc.I64)
                                        w = b.load(b.gep(lj, [b.mul(c, g.i64(BT))], source_etype=lc.F32), typ=vt,
                                                   align=4)
                                        b.store(b.fadd(b.load(accs[u], typ=vt), w), accs[u])
                            for u in range(U):
                                b.store(b.load(accs[u], typ=vt), yps[u], align=4)
    b.ret_void()
    return fn


def build_module(spec: KernelSpec, triple: str | None = None, permute: bool | None = None):
    """permute: the gemv's AVX-512 permute lookup (`_permute_lookup`; R = 16, K <= 256) instead of the gather; by
    default where GEMV_PERMUTE allows it, the module is for this host and the host has AVX-512."""
    mod = lc.new_module(f"codebook_{spec.vec_len}_{spec.K}_{spec.R}", triple)
    if permute is None:
        permute = GEMV_PERMUTE and triple is None and bool(lc.llvm.get_host_cpu_features().get("avx512f"))
    permute = permute and spec.R == 16 and spec.K <= 256
    lc.add_parallel_for(mod, _gen_gemv(mod, spec, permute))
    emit_split_k_top(mod, spec, lc.add_parallel_for(mod, _gen_gemvk(mod, spec, permute)), "gemvk_work_par",
                     lambda g, a, t: _gemvk_slot(g, a, spec, t)[::3], columns=True)
    lc.add_parallel_for(mod, _gen_gemm(mod, spec))
    lc.add_parallel_for(mod, _gen_gemm(mod, spec, "batch"))
    return mod


_PAR_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


@functools.cache
def compiled(spec: KernelSpec) -> dict[str, object]:
    """JIT the kernels for `spec` on this host (once per process)."""
    addrs = lc.jit(build_module(spec), ["gemv_work_par", "gemvk_work_par", "gemm_work_par", "gemmb_work_par"])
    return {k.removesuffix("_work_par"): _PAR_T(v) for k, v in addrs.items()}


def available() -> bool:
    try:
        lc.target_machine()
        return True
    except Exception:  # noqa: BLE001 - no usable LLVM target here -> the reference serves
        return False


# -- one-time repack per weight tensor -------------------------------------------------------------------
@dataclass
class Packed:
    spec: KernelSpec
    codes_r: torch.Tensor
    cbt: torch.Tensor
    perm: torch.Tensor | None
    ow: torch.Tensor | None
    scale: torch.Tensor | None
    bias: torch.Tensor | None
    out_f: int
    in_f: int
    n_out: int
    n_vec: int
    groups: int
    n_rb: int

    def static_args(self) -> list[int]:
        a = [0] * N_ARGS
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        a[A_PERM], a[A_CODES], a[A_CBT] = ptr(self.perm), self.codes_r.data_ptr(), self.cbt.data_ptr()
        a[A_OW], a[A_SCALE], a[A_BIAS] = ptr(self.ow), ptr(self.scale), ptr(self.bias)
        a[A_OUT], a[A_NOUT], a[A_NVEC], a[A_GROUPS] = self.out_f, self.n_out, self.n_vec, self.groups
        a[A_RPG], a[A_NRB], a[A_IN_F] = self.out_f // self.groups, self.n_rb, self.in_f
        return a

    def argv(self):
        """A fresh ctypes copy of the static argument block (the template is built once per weight)."""
        t = self.__dict__.get("_argv")
        if t is None:
            t = self.__dict__["_argv"] = (ctypes.c_int64 * N_ARGS)(*self.static_args())
        return type(t).from_buffer_copy(t)


def repack_codes(codes: torch.Tensor, code_bits: int, n_vec: int, spec: KernelSpec) -> torch.Tensor:
    """Stored codes [S, out, row_bytes] -> the kernel layout codes_r (see the module docstring)."""
    idx = unpack_codes(codes, code_bits, n_vec)  # [S, out, n_vec]
    S, out = idx.shape[:2]
    R = spec.R
    n_rb = math.ceil(out / R)
    idx = torch.nn.functional.pad(idx, (0, 0, 0, n_rb * R - out)).view(S, n_rb, R, n_vec)
    blocks = [idx[..., j0:j0 + spec.JB].permute(0, 1, 3, 2).reshape(S, -1) for j0 in range(0, n_vec, spec.JB)]
    flat = torch.cat(blocks, 1).to(torch.int32)
    return flat.to(torch.uint8 if spec.code_bytes == 1 else torch.int16).contiguous()  # int16 wraps: same bits


def pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits,
                vector_bits: int | None = None) -> Packed | None:
    """The kernel's form of one weight (vector_bits: the target's SIMD width, default this host's)."""
    stages, out_f, _ = codes.shape
    _, groups, K, v = codebooks.shape
    n_out = outlier_w.shape[1] if outlier_w.numel() else 0
    n_vec = math.ceil((in_features - n_out) / vec_len)
    spec = make_spec(vec_len, K, stages, out_f // groups, groups > 1, vector_bits)
    if spec is None or not _well_formed(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len,
                                        code_bits, n_vec):
        return None  # the reference raises or handles it; the kernel never reads out of bounds
    f32 = lambda t: t.detach().to(torch.float32).contiguous() if t.numel() else None  # noqa: E731
    cbt = codebooks.detach().to(torch.float32).permute(0, 1, 3, 2).contiguous()  # [S, G, v, K]
    return Packed(spec, repack_codes(codes, code_bits, n_vec, spec), cbt,
                  perm.detach().to(torch.int64).contiguous() if perm.numel() else None,
                  f32(outlier_w), f32(scale), f32(bias), out_f, in_features, n_out, n_vec, groups,
                  math.ceil(out_f / spec.R))


def _well_formed(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits, n_vec) -> bool:
    stages, out_f, row_bytes = codes.shape
    S, G, K, v = codebooks.shape
    n_out = outlier_w.shape[1] if outlier_w.numel() else 0
    ok = (S == stages and v == vec_len and out_f % G == 0 and row_bytes * 8 >= n_vec * code_bits
          and (not outlier_w.numel() or tuple(outlier_w.shape) == (out_f, n_out))
          and scale.numel() in (0, out_f) and bias.numel() in (0, out_f)
          and (perm.numel() == in_features if perm.numel() or n_out else True))
    if ok and perm.numel():
        ok = int(perm.min()) >= 0 and int(perm.max()) < in_features
    return ok and int(unpack_codes(codes, code_bits, n_vec).max()) < K


class _PackCache:
    """Packed weights keyed by the identity (weak references) and `_version` of the tensors they came from."""

    def __init__(self):
        self._d: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def get(self, tensors: tuple, make):
        codes = tensors[0]
        hit = self._d.get(id(codes))
        if hit is not None:  # the per-call path of every layer: one plain loop, no generators
            refs, versions, packed = hit
            for r, t, v in zip(refs, tensors, versions):
                if r() is not t or t._version != v:
                    break
            else:
                return packed
        packed = make()
        i = id(codes)
        refs = (weakref.ref(codes, lambda _r, i=i: self._d.pop(i, None)),
                *(weakref.ref(t) for t in tensors[1:]))
        with self._lock:
            self._d[i] = (refs, tuple(t._version for t in tensors), packed)
        return packed


_CACHE = _PackCache()
LUT_KERNELS = ("q8", "q16")  # batch-1 LUT kernels, fastest first (llvm_codebook_q8, llvm_codebook_q16)
_CACHE_LUT = {name: _PackCache() for name in LUT_KERNELS}


def default_lut() -> tuple[str, ...]:
    """The LUT kernels the "llvm" entry tries at batch 1, in order: EDGETK_LUT (comma-separated names, e.g. "q8" or
    "q8,q16"; "none" for the float32 kernels only), else none: the float32 kernel, equal to the reference up to
    summation order, so that eager runs match exported graphs token for token (the int16 LUT, ~1e-5, measured
    1.09-1.35x slower than it on every smollm2 / 4096^2 shape, 1 and 2 threads, session 10). The int8 LUT (q8) is
    an accuracy trade-off like onnxruntime's accuracy_level=4 and is chosen explicitly."""
    env = table.env("EDGETK_LUT")
    return () if env is None else _parse_lut_env(env)


@functools.lru_cache(maxsize=16)
def _parse_lut_env(text: str) -> tuple[str, ...]:  # read on every batch-1 call: parse each value once
    return parse_lut(text)


def parse_lut(text: str, what: str = "EDGETK_LUT") -> tuple[str, ...]:
    """Comma-separated LUT kernel names ("none" and blanks dropped) -> tuple; unknown names raise ConfigError."""
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in LUT_KERNELS]
    if unknown:
        raise ConfigError(f"{what} names unknown LUT kernels {unknown}", hint=f"use names among {LUT_KERNELS}")
    return names


PREFILL_MODES = ("auto", "few", "panel", "lut", "dense", "bf16", "int8")
_CACHE_DQ = {"dense": _PackCache(), "bf16": _PackCache(), "int8": _PackCache()}
# Prefill cost model of `prefill_choice`, ns per unit on one thread (fitted on an AVX-512 Xeon at 64 tokens over the
# smollm2 shapes and 4096^2, checked at 16 and 256; only their ratios matter): the LUT GEMM pays LUT_BUILD per token
# and input x codeword and LUT_GATHER per token and weight; the dense path pays DQ_COPY per weight (dequantizing,
# once a call) and DENSE_MAC per token and weight (oneDNN's fp32 GEMM). Threads: the LUT GEMM splits batch tiles
# (all of its work) when there are enough, else rows (the gather only); the dense path gains DENSE_SCALING of a
# thread per extra thread (measured 1.2-1.7x on 2).
LUT_BUILD, LUT_GATHER, DQ_COPY, DENSE_MAC, DENSE_SCALING = 0.0209, 0.0085, 0.15, 0.0133, 0.6
# The panel GEMM (llvm_codebook_few, mode "panel"): PANEL_DQ per weight (each row tile decoded once into L1) and
# PANEL_MAC per token (inputs padded to tiles of PANEL_TT) and weight; it splits row tiles over the threads with no
# work repeated, so it is scaled like the LUT GEMM's batch split (PANEL_SCALING 1: the same assumption);
# fitted on the session-25 Zen 3 (AVX2) against the constants above over the smollm2 shapes: ahead of the dense
# path at 64 tokens (0.85-0.9x its time), behind it at 256 (1.15-1.2x: oneDNN's GEMM is the faster one once the
# copy is amortised), so they cross at ~128 tokens.
PANEL_DQ, PANEL_MAC, PANEL_SCALING = 0.04, 0.0139, 1.0
# A LUT GEMM call's fixed cost (its input transposes, the tiles' LUT set-up), fitted on the same host at 16 and 64
# tokens (576x576, 576x1536, 1536x576, 2048x32, 4096x256; without it the model sent 13-24 tokens of the small
# layers to the LUT GEMM, measured 1.1-1.45x slower than the panel GEMM there).
LUT_CALL = 40e3


def prefill_mode() -> str:
    """How the "llvm" entry runs batch > 1: EDGETK_PREFILL, else "auto" (see `prefill_choice`).

    "few": the few-input kernel (llvm_codebook_few: codewords decoded in registers, ~1e-6 from the reference; what
    "auto" runs up to its `max_rows` inputs, slower than the GEMMs beyond that). "panel": the same kernel with each
    row tile decoded once into a float32 tile in L1 that tiles of 6 inputs share (~1e-6; any format).
    "lut": the float32 LUT GEMM (~1e-6 from the reference). "dense": dequantize the codes to a float32 weight tile
    (llvm_dequant) and run oneDNN's fp32 matmul (~1e-6 too). "bf16": dequantize to bf16 and run oneDNN's bf16
    matmul (~50 dB SNR; x86 hosts with AVX-512 BF16 / AMX, elsewhere the float32 choice runs). "int8": int8
    codewords times the activations quantized to 7 bits per token and 64 inputs, int32 sums (llvm_gemm_i8: ~37 dB
    SNR; hosts with an int8 multiply-add -- AVX2, AVX-512, aarch64 dot product -- elsewhere the dense path runs)."""
    mode = (table.env("EDGETK_PREFILL") or "auto").strip() or "auto"
    if mode not in PREFILL_MODES:
        raise ConfigError(f"EDGETK_PREFILL={mode!r} is not a prefill mode", hint=f"use one of {PREFILL_MODES}")
    return mode


def dense_ok(p: Packed) -> bool:
    """The dequantizing paths take this format: one stage, K <= 256 (see llvm_dequant)."""
    return p.spec.stages == 1 and p.spec.K <= 256


def prefill_choice(p: Packed, rows: int, mode: str = "auto", n_threads: int | None = None) -> str:
    """The path that runs `rows` > 1 inputs through weight `p` under `mode`: "few", "panel", "lut", "dense", "bf16"
    or "int8".

    "auto": up to `llvm_codebook_few.max_rows` inputs (12: speculative-decoding verify
    trees, short chunks) the few-input kernel (codewords decoded in registers, float32, any format); more: bf16
    where the caller allowed reduced-precision fp32 matmuls the way PyTorch spells it
    (`torch.set_float32_matmul_precision("medium")`) and the host has bf16 matmuls; otherwise whichever of the
    float32 paths the cost model (LUT_BUILD ... LUT_CALL) finds cheapest: the LUT GEMM builds the whole LUT per
    token however few rows the layer has, so layers with few rows (out below ~1 K at 64 tokens) go to the panel GEMM,
    and past ~128 tokens to the dense path (a float32 copy of the weight per call, then oneDNN's faster GEMM)
    ("auto" never picks int8: only when asked for). bf16 and int8 on a host without them run dense; "dense" (and
    bf16, int8) on a format they cannot run fall back to the LUT GEMM."""
    nt = torch.get_num_threads() if n_threads is None else n_threads
    if mode != "auto":
        return _prefill_choice(p, rows, mode, nt)
    key = (rows, nt, torch.get_float32_matmul_precision())
    seen = p.__dict__.setdefault("_choices", {})  # every layer asks again each call with the same few keys (~6 us)
    choice = seen.get(key)
    if choice is None:
        if len(seen) > 256:  # (prompts of ever-new lengths)
            seen.clear()
        choice = seen[key] = _prefill_choice(p, rows, mode, nt)
    return choice


def _prefill_choice(p: Packed, rows: int, mode: str, n_threads: int) -> str:
    if mode == "auto" and rows <= few_module().max_rows(n_threads):
        return "few"
    if mode in ("few", "panel"):
        return mode
    if mode == "auto":
        if torch.get_float32_matmul_precision() == "medium" and dequant_module().host_ok():
            mode = "bf16"
        else:
            nt = max(1, n_threads)
            w = p.out_f * p.n_vec * p.spec.vec_len
            build, gather = rows * LUT_BUILD * p.n_vec * p.spec.vec_len * p.spec.K, rows * LUT_GATHER * w
            split = split_batch(math.ceil(rows / p.spec.BT), nt)
            pt = few_module().PANEL_TT
            cost = {"lut": LUT_CALL + p.spec.stages * ((build + gather) / nt if split else build + gather / nt),
                    "panel": w * (PANEL_DQ * p.spec.stages + PANEL_MAC * -(-rows // pt) * pt)
                    / (1 + PANEL_SCALING * (min(nt, p.n_rb) - 1))}
            if dense_ok(p):
                cost["dense"] = (DQ_COPY * w + DENSE_MAC * rows * w) / (1 + DENSE_SCALING * (nt - 1))
            mode = min(cost, key=cost.get)
    if (mode == "bf16" and not dequant_module().host_ok()) or (mode == "int8" and not int8_module().host_ok()):
        mode = "dense"
    return mode if mode in ("lut", "panel") or dense_ok(p) else "lut"


@functools.cache
def dequant_module():
    """The llvm_dequant module (dense and bf16 prefill), imported on first use."""
    from . import llvm_dequant

    return llvm_dequant


@functools.cache
def few_module():
    """The llvm_codebook_few module (few-input GEMM: "auto" up to its max_rows inputs), imported on first use."""
    from . import llvm_codebook_few

    return llvm_codebook_few


@functools.cache
def int8_module():
    """The llvm_gemm_i8 module (int8 prefill), imported on first use."""
    from . import llvm_gemm_i8

    return llvm_gemm_i8


@functools.cache
def lut_kernel(name: str):
    """The module of batch-1 LUT kernel `name` (pack_weight, gemv, host_ok), imported on first use."""
    import importlib

    return importlib.import_module(f"{__package__}.llvm_codebook_{name}")


def lut_available(name: str) -> bool:
    return available() and lut_kernel(name).host_ok()


def _threads(p: Packed, n_threads: int | None, rows: int = 1) -> int:
    """Threads for `rows` inputs through p's row tiles: n_threads if given, else as many as have MIN_CODES_PER_THREAD
    codes (x inputs) each."""
    n = torch.get_num_threads() if n_threads is None else n_threads
    work = rows * p.spec.stages * p.out_f * p.n_vec
    return max(1, min(n, p.n_rb, work // MIN_CODES_PER_THREAD if n_threads is None else n))


def gemv_stride(p: Packed, n_threads: int = 1) -> int:
    """Scratch bytes per thread of the gemv kernel (any thread count): LUT block, permuted x, outlier x (+ 128
    bytes: the permute lookup's last table may read past the LUT block)."""
    n = 4 * (p.spec.stages * p.spec.JB * p.spec.K + p.n_vec * p.spec.vec_len + p.n_out) + 192
    return n + (-n % 64)


def gemvk_stride(p: Packed, n_threads: int = 1) -> int:
    """Scratch bytes per thread of the split-K gemv (`gemvk`; any thread count): partial y, LUT block (+ 32 floats
    the permute lookup may read past it), permuted x, outlier x."""
    s = p.spec
    n = 4 * (p.n_rb * s.R + s.stages * s.JB * s.K + 32 + p.n_vec * s.vec_len + p.n_out) + 64
    return n + (-n % 64)


def gemm_stride(p: Packed) -> int:
    n = 4 * p.spec.stages * p.spec.JS * p.spec.K * p.spec.BT + 64
    return n + (-n % 64)


def launch(p: Packed, fn, x: torch.Tensor, stride, n_threads: int | None, lead: tuple = ()) -> torch.Tensor:
    """Run the batch-1 kernel `fn` (a compiled `*_work_par`) for one input vector x [in] -> y [*lead, out] (`lead`:
    the caller's leading dimensions, all 1: allocated so, no view afterwards).

    `stride(p, n_threads)`: scratch bytes per thread. Shared by the float32, int16- and int8-LUT gemv kernels.
    Cached per weight and calling thread: the thread count, the scratch size and the argument block with its static
    fields (the kernel runs without the GIL, so each Python thread fills its own block); a call then fills in x, y
    and the scratch pointer only (session 27: 0.5-0.9 µs of a 3.5 µs launch saved)."""
    key = (n_threads, torch.get_num_threads() if n_threads is None else 0, _get_ident(), stride)
    cache = p.__dict__.get("_launch")
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        nt = _threads(p, n_threads)
        st = stride(p, nt)
        a = p.argv()
        a[A_SSTRIDE] = st
        hit = p.__dict__.setdefault("_launch", {})[key] = (nt, st * nt, a, p.n_rb * p.spec.R)
    nt, need, a, n = hit
    y = torch.empty(*lead, n)
    a[A_X] = x.data_ptr()
    a[A_Y] = y.data_ptr()
    a[A_SCR] = lc.scratch(need).data_ptr()
    fn(a, p.n_rb, nt)
    return y if n == p.out_f else y[..., :p.out_f].clone()


def gemv_fn(p: Packed, make, attr: str = "_gemv_fn"):
    """The batch-1 kernel of `p`, `make(p.spec)` on first use, then kept on the weight (looking it up by spec
    hashes the spec dataclass: ~1 us a call)."""
    fn = p.__dict__.get(attr)
    if fn is None:
        fn = p.__dict__[attr] = make(p.spec)
    return fn


def gemv(p: Packed, x: torch.Tensor, n_threads: int | None = None, lead: tuple = (),
         split_k: bool | None = None) -> torch.Tensor:
    """One input vector x [in] (float32, contiguous) -> y [*lead, out]. split_k: the code columns split over the
    threads (`gemvk`) instead of the row tiles (`gemv`); default: GEMV_SPLIT_K, where building a column's table
    costs something (K * vec_len >= SPLIT_K_MIN_LUT) on more than one thread (on one, the row form: the same work
    without the partial-output bookkeeping)."""
    if split_k is None:
        split_k = (GEMV_SPLIT_K and p.spec.K * p.spec.vec_len >= SPLIT_K_MIN_LUT
                   and (n_threads or torch.get_num_threads()) > 1)
    if split_k:
        return launch(p, gemv_fn(p, lambda s: compiled(s)["gemvk"], "_gemvk_fn"), x, gemvk_stride, n_threads, lead)
    return launch(p, gemv_fn(p, lambda s: compiled(s)["gemv"]), x, gemv_stride, n_threads, lead)


def gemm_inputs(p: Packed, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [B, in] -> (permuted x [B, in], xt [n_bt, n_vec*v, BT]: the quantized columns, batch-minor)."""
    B, BT, v = x2.shape[0], p.spec.BT, p.spec.vec_len
    n_bt = math.ceil(B / BT)
    xp = x2.index_select(1, p.perm) if p.perm is not None else x2
    xq = torch.nn.functional.pad(xp[:, p.n_out:], (0, p.n_vec * v - (p.in_f - p.n_out), 0, n_bt * BT - B))
    return xp, xq.view(n_bt, BT, -1).transpose(1, 2).contiguous()


def gemm_finish(p: Packed, yt: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """yt [n_bt, n_rb*R, BT] (VQ part) -> y [B, out] with outliers, scale and bias."""
    return finish(p, yt.transpose(1, 2).reshape(-1, yt.shape[1])[:xp.shape[0], :p.out_f], xp)


def finish(p: Packed, y: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """VQ part y [B, out] -> + outlier columns (from the permuted inputs xp), * scale, + bias."""
    if p.ow is not None:
        y = torch.addmm(y, xp[:, :p.n_out], p.ow.T)
    if p.scale is not None:
        y = y * p.scale
    if p.bias is not None:
        y = y + p.bias
    return y.contiguous()


def split_batch(n_bt: int, n_threads: int) -> bool:
    """Whether the prefill GEMM splits its n_bt batch tiles over the threads (`gemmb`: enough of them, so that no
    LUT is built twice) rather than the row tiles (`gemm`)."""
    return n_threads > 1 and n_bt >= n_threads


def gemm(p: Packed, x2: torch.Tensor, n_threads: int | None = None) -> torch.Tensor:
    """Inputs x2 [B, in] (float32) -> y [B, out]."""
    spec, stride = p.spec, gemm_stride(p)
    xp, xt = gemm_inputs(p, x2)
    n_bt = xt.shape[0]
    n = torch.get_num_threads() if n_threads is None else n_threads
    by_batch = split_batch(n_bt, n)
    nt = max(1, min(n, n_bt if by_batch else p.n_rb))
    yt = torch.empty(n_bt, p.n_rb * spec.R, spec.BT, dtype=torch.float32)
    scr = lc.scratch(stride * nt)
    a = p.static_args()
    a[A_X], a[A_Y], a[A_SCR], a[A_SSTRIDE], a[A_NBT] = xt.data_ptr(), yt.data_ptr(), scr.data_ptr(), stride, n_bt
    compiled(spec)["gemmb" if by_batch else "gemm"]((ctypes.c_int64 * N_ARGS)(*a), n_bt if by_batch else p.n_rb, nt)
    return gemm_finish(p, yt, xp)


def codebook_gemm_llvm(x, codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits,
                       n_threads: int | None = None, exact: bool = False, lut: tuple[str, ...] | None = None,
                       prefill: str | None = None):
    """Same signature and result as `codebook_gemm_reference`; formats it does not take go there.

    Batch-1 calls use the first kernel of `lut` (default: `default_lut()`) that this host runs and that takes the
    format: "q8" (int8 LUT, llvm_codebook_q8: SNR ~38 dB against the reference, like int8 activations) or "q16"
    (int16 LUT, llvm_codebook_q16: relative error ~1e-5 of the output range); exact=True (or lut=()) keeps the
    float32 LUT everywhere (equal to the reference up to summation order). Batch > 1 follows `prefill` (default:
    `prefill_mode()`) through `prefill_choice`: "lut" (float32 LUT GEMM), "dense" (dequantize to a float32 tile +
    fp32 matmul), "bf16" (dequantize to bf16 + bf16 matmul where the host has it) or "int8" (int8 codewords x int8
    activations, llvm_gemm_i8); exact=True keeps the LUT GEMM.
    """
    args = (x, codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)
    if x.dtype != torch.float32 or not x.is_cpu or codes.dtype != torch.uint8 or x.shape[-1] != in_features:
        return codebook_gemm_reference(*args)
    tensors = (codes, codebooks, perm, outlier_w, scale, bias)
    rows = x.numel() // in_features
    if rows == 1:  # decode: every layer once per token, so the path stays short (the kernels read x's pointer)
        xv = x if x.is_contiguous() else x.contiguous()
        for name in () if exact else default_lut() if lut is None else lut:
            mod = lut_kernel(name)
            if not mod.host_ok():
                continue
            pq = _CACHE_LUT[name].get(tensors, lambda: mod.pack_weight(*tensors, in_features, vec_len, code_bits))
            if pq is not None:
                return mod.gemv(pq, xv, n_threads, x.shape[:-1])
    p = _CACHE.get(tensors, lambda: pack_weight(*tensors, in_features, vec_len, code_bits))
    if p is None:
        return codebook_gemm_reference(*args)
    if rows == 1:
        return gemv(p, xv, n_threads, x.shape[:-1])
    x2 = (x if x.dim() == 2 else x.reshape(rows, in_features)).contiguous()
    mode = "lut" if exact or rows <= 1 else prefill_choice(p, rows, prefill or prefill_mode(), n_threads)
    if mode in ("few", "panel"):
        y = few_module().gemm(p, x2, n_threads, panel=mode == "panel")
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], p.out_f)
    if mode == "int8":
        m8 = int8_module()
        p8 = _CACHE_DQ[mode].get(tensors, lambda: m8.pack_weight(*tensors, in_features, vec_len, code_bits, base=p))
        if p8 is not None:
            return m8.gemm(p8, x2, n_threads).reshape(*x.shape[:-1], p8.base.out_f)
    elif mode != "lut":
        dq = dequant_module()
        dtype = torch.float32 if mode == "dense" else torch.bfloat16
        pd = _CACHE_DQ[mode].get(tensors, lambda: dq.pack_weight(*tensors, in_features, vec_len, code_bits, base=p,
                                                                 dtype=dtype))
        if pd is not None:
            return dq.gemm(pd, x2, n_threads).reshape(*x.shape[:-1], pd.base.out_f)
    if rows == 0:
        y = x2.new_zeros(0, p.out_f)
    else:
        y = gemm(p, x2, n_threads)
    return y.reshape(*x.shape[:-1], p.out_f)


table.register("codebook_gemm", "cpu", "eager", "llvm", codebook_gemm_llvm, priority=10, available=available)
table.register("codebook_gemm", "cpu", "eager", "llvm-f32", functools.partial(codebook_gemm_llvm, exact=True),
               priority=5, available=available)
for _name in LUT_KERNELS:  # pinned LUT kernels (tests, benchmarks): batch 1 through that kernel first
    table.register("codebook_gemm", "cpu", "eager", f"llvm-{_name}",
                   functools.partial(codebook_gemm_llvm, lut=LUT_KERNELS[LUT_KERNELS.index(_name):]), priority=4,
                   available=functools.partial(lut_available, _name))
