"""Prefill (batch > 1) codebook GEMM in int8 (opt-in: EDGETK_PREFILL=int8), for hosts whose fp32 FMA rate is the
limit and that have no bf16 matmul (AVX2 x86, aarch64 boards): codes -> int8 codeword copies, one block of rows
at a time, times int8 activations, accumulated in int32 (llvmlite-generated, multi-threaded over row blocks).

Why: at 64 tokens the float32 paths run at best at `F.linear`'s rate (the dense path is the same GEMM plus the
dequantization), so the smaller smollm2 layers lose to it; an int8 multiply-add does 2-4x the multiplies of an
fp32 FMA per instruction (AVX2 `vpmaddubsw` + `vpmaddwd`, AVX-512 VNNI `vpdpbusd`, aarch64 `sdot`).

Arithmetic (`reference` spells it out in PyTorch; tests compare the kernel with it exactly up to float rounding):

* codewords: per codebook (output group), s_w = max|codebook| / 127, w = round(cb / s_w) (int8, |w| <= 127);
* activations: per token and group of GS = 64 inputs, s = max|x| / 63, q = round(x / s) in [-63, 63] (7 bits),
  stored as u = q + 64 in [1, 127] -- so `vpmaddubsw` (unsigned x signed bytes, pairs summed into a saturating
  int16) never saturates (|u0 w0 + u1 w1| <= 2 * 127 * 127 < 2**15), and the same bytes serve `sdot` (signed x
  signed); the weights get the 8th bit because their rounding costs more perplexity than the activations' (on a
  4-bit smollm2-135m VQ model, 8 eval windows, emulated in PyTorch: int8 codewords alone +1.2 %, 7-bit ones +2.9 %;
  7-bit activations alone in groups of 64 +1.5 %, 8-bit +0.9 %; both, int8 codewords and 7-bit activations in
  groups of 32 / 64 / 128: +2.1 / +2.8 / +3.8 %; this kernel, groups of 64: +3.1 %, 44.79 -> 46.18);
* y[t, r] = s_w(r) * sum_g s[t, g] * (sum_{k in g} u[t, k] w[r, k]  -  64 wsum[r, g]), wsum[r, g] = sum_{k in g}
  w[r, k] (the +64 shift; summed per block of rows by the same multiply-add against ones).

So y is ~37 dB SNR from the float32 reference (like the int8 LUT at batch 1; tested >= 30 dB on random data); a
NaN or infinite input makes its token's outputs non-finite, as in float32 (the runtime's finite-logits check sees it);
outlier columns, the permutation, scale and bias are applied in float32 around it (`llvm_codebook.finish`), as in
the dense path. Formats: one stage, K <= 256 (codes up to 8 bits), any vec_len and output groups.

Layout: the codes of a block of RB = 16 rows are copied into a per-thread scratch block [Kp/4][16 rows][4 bytes]
(4 consecutive inputs of one row = one int32), so one 64-byte vector holds 16 rows x 4 inputs; a token's 4 int8
activations are broadcast to all 16 rows, and one multiply-add per (token, 4 inputs) accumulates the 16 rows'
int32 sums. TB tokens are blocked per pass over the row block (16 ymm on AVX2: 4 tokens; AVX-512: 8).
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch

from . import llvm_codebook as lk
from . import llvm_common as lc
from .codebook_gemm import unpack_codes

ir = lc.ir
GS = 64  # activation group: one scale per token and GS inputs (32: -0.7 % perplexity, +20-55 % time on AVX2)
RB = 16  # rows per block (one <64 x i8> vector = 16 rows x 4 inputs)
SHIFT = 64  # activation bytes are q + SHIFT, q in [-AQ, AQ]
AQ, WQ = 63, 127  # largest |q| (activations, 7 bits) and |w| (codewords, 8 bits)
(I_X, I_XQ, I_SX, I_T, I_KP, I_IDX, I_CBW, I_SW, I_Y, I_SCR, I_SSTRIDE, I_NVEC, I_RPG, I_K, I_OUT,
 I_OSTRIDE) = range(16)
N_ARGS = 16
ISAS = ("vnni512", "avx512bw", "avx2", "dot", "generic")
TB = {"vnni512": 8, "avx512bw": 8, "avx2": 4, "dot": 4, "generic": 4}


@functools.cache
def host_isa() -> str:
    """The multiply-add this host runs: AVX-512 VNNI, AVX-512BW, AVX2, aarch64 dot product, else plain IR."""
    lc._init()
    triple = lc.llvm.get_process_triple()
    f = lc.llvm.get_host_cpu_features()
    if triple.startswith("x86_64"):
        if f.get("avx512bw") and f.get("avx512vnni"):
            return "vnni512"
        if f.get("avx512bw"):
            return "avx512bw"
        if f.get("avx2"):
            return "avx2"
    if triple.startswith("aarch64") and f.get("dotprod"):
        return "dot"
    return "generic"


def host_ok() -> bool:
    """Worth choosing here: a host with an int8 multiply-add instruction (the plain-IR form runs anywhere, slowly)."""
    return host_isa() != "generic"


def _intrinsic(mod, name, ret, args):
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)


def _vec(n, t):
    return ir.VectorType(t, n)


def _slice(b, v, lo, n):
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_vec(n, lc.I32), list(range(lo, lo + n))))


def _concat(b, parts):
    while len(parts) > 1:
        n = parts[0].type.count
        parts = [b.shuffle_vector(parts[i], parts[i + 1], ir.Constant(_vec(2 * n, lc.I32), list(range(2 * n))))
                 for i in range(0, len(parts), 2)]
    return parts[0]


def _madd(g: lc.Gen, isa: str, acc, x, w):
    """acc (<16 x i32>) + per row i: sum_{j<4} x[4i+j] * w[4i+j] (x, w: <64 x i8>; x in [0, 127], w signed)."""
    b, mod = g.b, g.fn.module
    v16, v32i16, v64 = _vec(16, lc.I32), _vec(32, lc.I16), _vec(64, lc.I8)
    if isa == "vnni512":
        fn = _intrinsic(mod, "llvm.x86.avx512.vpdpbusd.512", v16, [v16, v16, v16])
        return b.call(fn, [acc, b.bitcast(x, v16), b.bitcast(w, v16)])
    if isa == "avx512bw":
        mb = _intrinsic(mod, "llvm.x86.avx512.pmaddubs.w.512", v32i16, [v64, v64])
        mw = _intrinsic(mod, "llvm.x86.avx512.pmaddw.d.512", v16, [v32i16, v32i16])
        ones = ir.Constant(v32i16, [1] * 32)
        return b.add(acc, b.call(mw, [b.call(mb, [x, w]), ones]))
    if isa == "avx2":
        v32, v16i16, v8 = _vec(32, lc.I8), _vec(16, lc.I16), _vec(8, lc.I32)
        mb = _intrinsic(mod, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32, v32])
        mw = _intrinsic(mod, "llvm.x86.avx2.pmadd.wd", v8, [v16i16, v16i16])
        ones = ir.Constant(v16i16, [1] * 16)
        halves = [b.call(mw, [b.call(mb, [_slice(b, x, h, 32), _slice(b, w, h, 32)]), ones]) for h in (0, 32)]
        return b.add(acc, _concat(b, halves))
    if isa == "dot":
        v4, v16i8 = _vec(4, lc.I32), _vec(16, lc.I8)
        fn = _intrinsic(mod, "llvm.aarch64.neon.sdot.v4i32.v16i8", v4, [v4, v16i8, v16i8])
        parts = [b.call(fn, [_slice(b, acc, 4 * h, 4), _slice(b, x, 16 * h, 16), _slice(b, w, 16 * h, 16)])
                 for h in range(4)]
        return _concat(b, parts)
    # plain IR: int16 products (|127 * 127| fits), then the four of each row summed in int32
    p = b.mul(b.zext(x, _vec(64, lc.I16)), b.sext(w, _vec(64, lc.I16)))
    p = b.sext(p, _vec(64, lc.I32))
    s = [b.shuffle_vector(p, ir.Constant(p.type, ir.Undefined), ir.Constant(v16, [4 * i + j for i in range(16)]))
         for j in range(4)]
    return b.add(acc, b.add(b.add(s[0], s[1]), b.add(s[2], s[3])))


def _gen_quant(mod):
    """i8q_work(args, tid, t0, t1): tokens [t0, t1) of x [T, Kp] -> xq [T, Kp] (bytes q + SHIFT), sx [T, Kp/GS]."""
    fn = ir.Function(mod, lc.WORK_TYPE, "i8q_work")
    g = lc.Gen(fn)
    b = g.b
    args, _tid, t0, t1 = fn.args
    x, xq, sx = (g.arg(args, i) for i in (I_X, I_XQ, I_SX))
    kp = g.arg(args, I_KP, lc.I64)
    ng = b.sdiv(kp, g.i64(GS))
    vf, vi = _vec(GS, lc.F32), _vec(GS, lc.I32)
    fabs = _intrinsic(mod, f"llvm.fabs.v{GS}f32", vf, [vf])
    rint = _intrinsic(mod, f"llvm.rint.v{GS}f32", vf, [vf])
    fmax = _intrinsic(mod, f"llvm.vector.reduce.fmaximum.v{GS}f32", lc.F32, [vf])  # NaN in -> NaN scale
    zero, aq = ir.Constant(lc.F32, 0.0), ir.Constant(lc.F32, float(AQ))
    with g.loop(t0, t1, name="t") as t:
        with g.loop(0, ng, name="g") as gi:
            off = b.add(b.mul(t, kp), b.mul(gi, g.i64(GS)))
            xv = b.load(b.gep(x, [off], source_etype=lc.F32), typ=vf, align=4)
            m = b.call(fmax, [b.call(fabs, [xv])])
            inv = b.select(b.fcmp_ordered(">", m, zero), b.fdiv(aq, m), zero)
            q = b.fptosi(b.call(rint, [b.fmul(xv, g.splat(inv, GS))]), vi)
            # a zero, NaN or infinite group: q = 0 (its scale, 0 / NaN / inf, makes the outputs 0 / non-finite)
            q = b.select(b.fcmp_ordered(">", inv, zero), q, ir.Constant(vi, [0] * GS))
            q = b.add(q, ir.Constant(vi, [SHIFT] * GS))
            b.store(b.trunc(q, _vec(GS, lc.I8)), b.gep(xq, [off], source_etype=lc.I8), align=1)
            g.store(lc.F32, b.fdiv(m, aq), sx, b.add(b.mul(t, ng), gi))
    b.ret_void()
    return fn


def _gen_gemm(mod, isa: str, v: int):
    """i8_work(args, tid, rb0, rb1): row blocks [rb0, rb1) of y [T, out] (row stride I_OSTRIDE)."""
    fn = ir.Function(mod, lc.WORK_TYPE, "i8_work")
    g = lc.Gen(fn)
    b = g.b
    args, tid, rb0, rb1 = fn.args
    arg = lambda i, t=lc.PTR: g.arg(args, i, t)  # noqa: E731
    i64 = g.i64
    xq, sx, idx, cbw, sw, y, scr = (arg(i) for i in (I_XQ, I_SX, I_IDX, I_CBW, I_SW, I_Y, I_SCR))
    T, kp, n_vec, rpg, K, out, ostride, sstride = (arg(i, lc.I64) for i in (I_T, I_KP, I_NVEC, I_RPG, I_K, I_OUT,
                                                                              I_OSTRIDE, I_SSTRIDE))
    ng = b.sdiv(kp, i64(GS))
    wblk = b.gep(scr, [b.mul(tid, sstride)], source_etype=lc.I8)  # [Kp/4][RB][4] bytes, then wsb
    wsb = b.gep(wblk, [b.mul(kp, i64(RB))], source_etype=lc.I8)  # [NG] x <16 x i32>: -SHIFT * wsum[r, g]
    v16i, v16f, v64 = _vec(16, lc.I32), _vec(16, lc.F32), _vec(64, lc.I8)
    zero16 = ir.Constant(v16i, [0] * 16)
    tb = TB[isa]
    kg = GS // 4  # 4-input steps per activation group
    with g.loop(rb0, rb1, name="rb") as rb:
        r0 = b.mul(rb, i64(RB))
        # the block's codewords, 4 inputs of a row per int32 (rows past `out` repeat the last row; inputs past
        # n_vec * v meet zero activations but are zeroed too, for wsum)
        with g.loop(b.sdiv(b.mul(n_vec, i64(v)), i64(4)), b.sdiv(kp, i64(4)), name="kz") as k4:
            b.store(zero16, b.gep(wblk, [b.mul(k4, i64(4 * RB))], source_etype=lc.I8), align=64)
        for r in range(RB):
            row = g.min(b.add(r0, i64(r)), b.sub(out, i64(1)))
            cbg = b.gep(cbw, [b.mul(b.mul(b.sdiv(row, rpg), K), i64(v))], source_etype=lc.I8)
            src = b.gep(idx, [b.mul(row, n_vec)], source_etype=lc.I8)
            with g.loop(0, n_vec, name=f"j{r}") as j:
                code = b.zext(b.load(b.gep(src, [j], source_etype=lc.I8), typ=lc.I8), lc.I64)
                cw = b.gep(cbg, [b.mul(code, i64(v))], source_etype=lc.I8)
                if v % 4 == 0:
                    for e in range(v // 4):
                        val = b.load(b.gep(cw, [i64(4 * e)], source_etype=lc.I8), typ=lc.I32, align=1)
                        k4 = b.add(b.mul(j, i64(v // 4)), i64(e))
                        b.store(val, b.gep(wblk, [b.add(b.mul(k4, i64(4 * RB)), i64(4 * r))], source_etype=lc.I8),
                                align=4)
                else:
                    for e in range(v):
                        val = b.load(b.gep(cw, [i64(e)], source_etype=lc.I8), typ=lc.I8)
                        k = b.add(b.mul(j, i64(v)), i64(e))
                        dst = b.add(b.add(b.mul(b.lshr(k, i64(2)), i64(4 * RB)), i64(4 * r)), b.and_(k, i64(3)))
                        b.store(val, b.gep(wblk, [dst], source_etype=lc.I8))
        ones = ir.Constant(v64, [1] * 64)
        with g.loop(0, ng, name="ws") as gi:  # -SHIFT * (the rows' weight sums per activation group)
            ws = g.var(v16i, zero16, name="ws")
            with g.loop(b.mul(gi, i64(kg)), b.mul(b.add(gi, i64(1)), i64(kg)), name="wk") as k4:
                wv = b.load(b.gep(wblk, [b.mul(k4, i64(4 * RB))], source_etype=lc.I8), typ=v64, align=64)
                b.store(_madd(g, isa, b.load(ws, typ=v16i), ones, wv), ws)
            b.store(b.mul(b.load(ws, typ=v16i), ir.Constant(v16i, [-SHIFT] * 16)),
                    b.gep(wsb, [b.mul(gi, i64(64))], source_etype=lc.I8), align=64)
        swv = b.load(b.gep(sw, [r0], source_etype=lc.F32), typ=v16f, align=4)

        def tokens(t0, nt: int):
            """Tokens [t0, t0 + nt) against the block (nt a compile-time count)."""
            facc = [g.var(v16f, ir.Constant(v16f, [0.0] * 16), name=f"f{i}") for i in range(nt)]
            xrow = [b.gep(xq, [b.mul(b.add(t0, i64(i)), kp)], source_etype=lc.I8) for i in range(nt)]
            with g.loop(0, ng, name="g") as gi:
                init = b.load(b.gep(wsb, [b.mul(gi, i64(64))], source_etype=lc.I8), typ=v16i, align=64)
                acc = [g.var(v16i, init, name=f"a{i}") for i in range(nt)]
                k0 = b.mul(gi, i64(kg))
                with g.loop(k0, b.add(k0, i64(kg)), name="k4") as k4:
                    wv = b.load(b.gep(wblk, [b.mul(k4, i64(4 * RB))], source_etype=lc.I8), typ=v64, align=64)
                    for i in range(nt):
                        xb = b.load(b.gep(xrow[i], [b.mul(k4, i64(4))], source_etype=lc.I8), typ=lc.I32, align=1)
                        xv = b.bitcast(g.splat(xb, 16), v64)
                        b.store(_madd(g, isa, b.load(acc[i], typ=v16i), xv, wv), acc[i])
                for i in range(nt):
                    s = g.load(lc.F32, sx, b.add(b.mul(b.add(t0, i64(i)), ng), gi))
                    a = b.sitofp(b.load(acc[i], typ=v16i), v16f)
                    b.store(g.fma(a, g.splat(s, 16), b.load(facc[i], typ=v16f)), facc[i])
            for i in range(nt):
                t = b.add(t0, i64(i))
                b.store(b.fmul(b.load(facc[i], typ=v16f), swv),
                        b.gep(y, [b.add(b.mul(t, ostride), r0)], source_etype=lc.F32), align=4)

        full = b.mul(b.sdiv(T, i64(tb)), i64(tb))
        with g.loop(0, full, step=tb, name="tb") as t0:
            tokens(t0, tb)
        with g.loop(full, T, name="tt") as t0:
            tokens(t0, 1)
    b.ret_void()
    return fn


def build_module(isa: str, v: int, triple: str | None = None):
    """`i8q_work_par` (activation quantization, items = tokens) and `i8_work_par` (items = row blocks)."""
    if isa not in ISAS:
        raise ValueError(f"isa {isa!r} is not one of {ISAS}")
    mod = lc.new_module(f"gemm_i8_{isa}_{v}", triple)
    lc.add_parallel_for(mod, _gen_quant(mod))
    lc.add_parallel_for(mod, _gen_gemm(mod, isa, v))
    return mod


@functools.cache
def compiled(isa: str, v: int):
    addrs = lc.jit(build_module(isa, v), ["i8q_work_par", "i8_work_par"])
    ty = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
    return ty(addrs["i8q_work_par"]), ty(addrs["i8_work_par"])


@dataclass
class Packed:
    idx: torch.Tensor  # uint8 [out, n_vec]
    cbw: torch.Tensor  # int8 [G, K, v]: round(cb / s_w)
    sw: torch.Tensor  # float32 [n_rb * RB]: each row's codebook scale s_w (padded rows: 0)
    base: lk.Packed  # the validated float32-kernel pack: perm, outliers, scale, bias and the sizes

    @property
    def kp(self) -> int:
        return GS * math.ceil(self.base.n_vec * self.base.spec.vec_len / GS)

    @property
    def n_rb(self) -> int:
        return math.ceil(self.base.out_f / RB)


def quantize_codebooks(cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, K, v] float -> (int8 codewords w, |w| <= WQ; float32 scale per codebook [G])."""
    c = cb.detach().float()
    m = c.abs().amax(dim=(1, 2))
    s = torch.where(m > 0, m / WQ, torch.ones_like(m))
    return torch.round(c / s[:, None, None]).clamp(-WQ, WQ).to(torch.int8).contiguous(), s


def pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits,
                base: lk.Packed | None = None) -> Packed | None:
    """The int8 kernel's form of one weight, or None for formats it does not take (see the docstring)."""
    base = base or lk.pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)
    if base is None or codes.shape[0] != 1 or codebooks.shape[2] > 256 or code_bits > 8:
        return None
    idx = unpack_codes(codes[0], code_bits, base.n_vec).to(torch.uint8).contiguous()
    cbw, s = quantize_codebooks(codebooks[0])
    rows = torch.arange(base.out_f) // (base.out_f // base.groups)
    n_rb = math.ceil(base.out_f / RB)
    sw = torch.zeros(n_rb * RB)
    sw[:base.out_f] = s[rows]
    return Packed(idx, cbw, sw, base)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, Kp] (Kp a multiple of GS) -> (bytes q + SHIFT, uint8 [T, Kp]; scales s [T, Kp/GS]) as the kernel
    computes them."""
    T, kp = x.shape
    xg = x.reshape(T, kp // GS, GS)
    m = xg.abs().amax(-1)
    inv = torch.where(m > 0, AQ / m, torch.zeros_like(m))
    q = torch.where(inv[..., None] > 0, torch.round(xg * inv[..., None]), 0.0) + SHIFT
    return q.to(torch.uint8).reshape(T, kp), m / AQ


def _inputs(p: Packed, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(permuted inputs xp, the codebook part padded to Kp as a contiguous float32 [T, Kp])."""
    q = p.base
    xp = x2.index_select(1, q.perm) if q.perm is not None else x2
    xc = xp[:, q.n_out:]
    pad = p.kp - xc.shape[1]
    xc = torch.nn.functional.pad(xc, (0, pad)) if pad else xc
    return xp, xc.contiguous()


def reference(p: Packed, x2: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in plain PyTorch (float64 sums of the exact integer products): y [T, out]."""
    q = p.base
    xp, xc = _inputs(p, x2)
    xu, s = quantize_activations(xc)
    rows = torch.arange(q.out_f) // (q.out_f // q.groups)
    w = p.cbw.long()[rows[:, None], p.idx.long()].reshape(q.out_f, -1)  # [out, n_vec * v]
    w = torch.nn.functional.pad(w, (0, p.kp - w.shape[1])).double().reshape(q.out_f, -1, GS)
    T = xu.shape[0]
    dots = torch.einsum("tgk,rgk->trg", xu.double().reshape(T, -1, GS), w) - SHIFT * w.sum(-1)[None]
    y = (dots * s.double()[:, None, :]).sum(-1) * p.sw[:q.out_f].double()
    return lk.finish(q, y.float(), xp)


def gemm(p: Packed, x2: torch.Tensor, n_threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """Inputs x2 [T, in] (float32) -> y [T, out] (float32); `isa`: another form than the host's (tests)."""
    q = p.base
    xp, xc = _inputs(p, x2)
    T, kp = xc.shape
    nt = max(1, torch.get_num_threads() if n_threads is None else n_threads)
    xq = torch.empty(T, kp, dtype=torch.uint8)
    sx = torch.empty(T, kp // GS)
    out_pad = p.n_rb * RB
    y = torch.empty(T, out_pad)
    stride = scratch_stride(kp)
    nt_rb = max(1, min(nt, p.n_rb))
    scr = lc.scratch(stride * nt_rb + 64)
    a = (ctypes.c_int64 * N_ARGS)()
    a[I_X], a[I_XQ], a[I_SX], a[I_T], a[I_KP] = xc.data_ptr(), xq.data_ptr(), sx.data_ptr(), T, kp
    a[I_IDX], a[I_CBW], a[I_SW], a[I_Y] = p.idx.data_ptr(), p.cbw.data_ptr(), p.sw.data_ptr(), y.data_ptr()
    a[I_SCR], a[I_SSTRIDE] = scr.data_ptr() + (-scr.data_ptr() % 64), stride
    a[I_NVEC], a[I_RPG], a[I_K], a[I_OUT], a[I_OSTRIDE] = q.n_vec, q.out_f // q.groups, p.cbw.shape[1], q.out_f, out_pad
    quant, work = compiled(isa or host_isa(), q.spec.vec_len)
    quant(ctypes.addressof(a), T, max(1, min(nt, T // 16)))
    work(ctypes.addressof(a), p.n_rb, nt_rb)
    return lk.finish(q, y if out_pad == q.out_f else y[:, :q.out_f], xp)


def scratch_stride(kp: int) -> int:
    """Scratch bytes per thread: the row block's codewords (RB * Kp) and its weight sums (64 per group)."""
    n = RB * kp + 64 * (kp // GS)
    return n + (-n % 64)
