"""Batch-1 codebook GEMV with an int8 lookup table held in registers (llvmlite-generated, x86 AVX-512 VBMI, x86
AVX2 and aarch64 NEON from one generator).

Per column block of JB code vectors, the float LUT (dot products of x with every codeword) is quantised to int8
with one scale per block (|q| <= 127, so |error| <= scale/2 = max|LUT|/254 per entry). The Kp <= 256 entries of
one column then sit in registers and a whole tile of R output rows is looked up with byte permutes:

* x86 (R = 64, AVX-512 VBMI): `vpermi2b` takes 128 entries from two zmm tables; Kp = 256 is two of them and a
  select on code bit 7 (Kp = 192: one and a `vpermb` of the third table), Kp = 128 one, Kp = 64 one `vpermb`;
* x86 without VBMI (R = 32, AVX2): `vpshufb` looks up 16 entries per 128-bit lane (each 16-entry table is
  broadcast to both lanes). Kp = 16 is one `vpshufb`; a larger Kp is Kp/16 of them, table t indexed by
  the low nibble `c & 15`, then a binary tree of `vpblendvb` keyed by code bits 4, 5, ... picks the code's table
  (`_avx2_tree`): Kp/16 shuffles + Kp/16 - 1 blends + a shift per tree level, so small codebooks (K = 16 / 64:
  `vq2-r16`, `vq3`) are cheap and K = 256 costs ~35 ops per 32 codes (the saturating per-table form it replaced,
  `AVX2_TREE = False`, 64), one row tile per column pass (`AVX2_TILES_PER_PASS`);
* aarch64 (R = 16, NEON): `tbl` over four q registers (64 entries), then `tbx` for each further 64 entries
  (out-of-range indices leave the lane unchanged); Kp = 16 / 32 is one `tbl` over one / two registers.

On hosts with an int8 dot product (vec_len <= 4, `VNNI`) the LUT is built in integers instead (`_emit_lut_int`):
the block's inputs quantized to int8 (scale max|x| / 127, as MatMulNBits' accuracy_level 4 does), the codebooks
stored as int8 (`int_codebooks`, scale max|entry| / 127 per codebook), exact dot products -- 16 per `vpdpbusd` on
AVX-512 VNNI, 8 per ymm `vpdpbusd` on AVX2-lookup hosts with AVX-VNNI or AVX-512 VNNI without VBMI (Kp a multiple
of 32), 4 per `sdot` on aarch64 cores with the dot product (ARMv8.2+) -- packed to int16 and rescaled to the int8
range with `vpmulhrsw` / `sqrdmulh`. On AVX-512 ~1.6x faster to build than the float32 FMAs and float -> int8
pass (Zen 5, 1536 inputs; the AVX2 form on the same host: the whole gemv 1.01-1.05x, its blend-tree lookups
dominate), ~2 dB lower SNR against the float reference (35-40 dB on random codebooks).

Entries are stored biased (u = q + 128, unsigned bytes). Per R-byte lookup result w (read as R/2 int16 words)
acc0 += w and acc1 += w >> 8: acc1 sums the odd bytes, acc0 - 256 * acc1 (mod 2**16) the even ones (both sums
<= JB * 255 < 2**15), 3 ops per vector. Per block y += float(sum - 128 * columns) * scale. One code byte is read
per code: the kernel streams the codes once, with no gather.

Threads split the (stage, column block) items, not the rows (split-K): each thread builds only its blocks' LUTs
(all of them before its tile loops, prefetching its first codes into L2 meanwhile) and streams one contiguous
range of the codes into its own partial y; the caller's thread sums the partials and applies the epilogue. The
result therefore depends on the thread count by float summation order only.

Codebooks with K <= 256 (codes up to 8 bits), any vec_len, residual stages and output groups whose rows are a
multiple of R; other formats use the float32 kernels (`llvm_codebook`). With K <= 16 the codes are streamed as
nibbles (half the bytes): one R-byte load serves two columns, `c & 15` and `c >> 4` each looked up in its own
column's table.

Repacked code layout (one-time per weight, cached): the float32 kernels' ``codes_r[s][jblk][rb][jj][i]`` with
R-row tiles, except that inside each R-byte vector byte p holds row ``p // 2 + (R/2) * (p % 2)`` of the tile
(even bytes rows 0..R/2-1, odd bytes rows R/2..R-1), so the two int16 accumulators hold rows in order. K <= 16
(`spec.nibbles`): the vectors of columns 2p and 2p+1 of a tile share one R-byte vector (column 2p in the low
nibbles); a block of jl columns holds ceil(jl / 2) vectors per tile (an odd block's last high nibbles are 0 and
look up a table of zeros), so stage s starts at ``s * n_rb * R * ceil(n_vec / 2)`` (JB is even).
Codebooks: ``cbT[s][g][t][slot]`` float32 with K zero-padded to Kp (a multiple of 64, or 16 / 32 on AVX2 and
NEON for K <= 16 / 32; codes never index padding); on aarch64 slot = codeword, on x86 the slots of each 64 are
ordered by `_x86_order` so that the in-lane packs that turn four 16-float LUT vectors into 64 int8 entries emit
them in codeword order. Integer builds: `int_codebooks`' bytes, [s][g][slot][4], slots in `int_slot_order`
(AVX-512: `_x86_order`; AVX2: the same interleave within 32 entries; aarch64: codeword order).
"""
from __future__ import annotations

import functools
import math

import torch

from edgetk.errors import ConfigError

from . import llvm_codebook as lk
from . import llvm_common as lc

ir = lc.ir
QMAX = 127  # int8 LUT range
BIAS = 128  # entries are stored as q + BIAS (unsigned bytes)
JB_INPUTS = 64  # inputs per LUT scale block (JB = JB_INPUTS // vec_len code vectors, at least 4)
PREFETCH = 16384  # bytes of codes prefetched ahead of the tile being read (0 = off)
PREFETCH_LOCALITY = 2  # llvm.prefetch locality: 3 = prefetcht0 (L1), 2 = prefetcht1 (L2)
TILES_PER_PASS = 2  # row tiles per column pass (they share the column's table loads)
# AVX2 with more than one 16-entry table: one tile per pass. Two tiles keep Kp/16 broadcast tables live across the
# pass, more than the 16 ymm registers hold, and LLVM spills them to the stack (session 21, Zen 3, 1 thread, 4096²:
# K=256 1.26x and K=64 1.31x faster with one tile; the nibble kernels of K <= 16, one table a column, keep two)
AVX2_TILES_PER_PASS = 1
BUILD_PREFETCH = 512  # bytes of codes prefetched into L2 per LUT column built (0 = off)
ISA_R = {"avx512vbmi": 64, "avx2": 32, "neon": 16}
# hosts with an int8 dot product (AVX-512 VNNI, AVX-VNNI, aarch64 dotprod), vec_len <= 4: the LUT built in integers
# (`_emit_lut_int`: x and the codebooks in int8, vpdpbusd / sdot dot products) instead of float32 FMAs and a
# float -> int8 pass; False: the float32 build everywhere
VNNI = True
CB_QMAX = 127  # integer codebooks: |q| <= CB_QMAX; x86 stores q + CB_BIAS in 0..254 (vpdpbusd's unsigned operand)
CB_BIAS = 127
INT_LANES = {"avx512vbmi": 16, "avx2": 8, "neon": 4}  # int32 dot products per vpdpbusd zmm / vpdpbusd ymm / sdot
AVX2_TREE = True  # AVX2, Kp > 16: low-nibble shuffles + a blend tree (`_avx2_tree`); False: saturating per-table form


@functools.cache
def host_isa() -> str | None:
    """The int8-LUT instruction set of this host, or None."""
    lc._init()
    triple = lc.llvm.get_process_triple()
    if triple.startswith("aarch64"):
        return "neon"
    f = lc.llvm.get_host_cpu_features()
    if not triple.startswith("x86_64"):
        return None
    if f.get("avx512vbmi") and f.get("avx512bw"):
        return "avx512vbmi"
    return "avx2" if f.get("avx2") else None


def host_ok() -> bool:
    return host_isa() is not None


INT_FEATURE = {"avx512vbmi": "avx512vnni", "avx2": "avxvnni", "neon": "dotprod"}  # the int8 dot product per ISA


@functools.cache
def host_vnni() -> bool:
    """Whether this host builds the int8 LUT in integers (`_emit_lut_int`): AVX-512 VNNI, AVX-VNNI (AVX2 hosts:
    Intel Alder Lake and later clients) or the aarch64 dot product (ARMv8.2+: Cortex-A55/A76 on, Jetson Orin)."""
    isa = host_isa()
    if isa is None:
        return False
    f = lc.llvm.get_host_cpu_features()
    # AVX2 hosts: the VEX form (avxvnni) or the EVEX ymm form (AVX-512 VNNI + VL without VBMI: Cascade Lake)
    return bool(f.get(INT_FEATURE[isa]) or (isa == "avx2" and f.get("avx512vnni") and f.get("avx512vl")))


def runs_here(isa: str, int_lut: bool = False) -> bool:
    """Whether a kernel of `isa` (and its integer LUT build) runs on this host: the host's own ISA, or AVX2 code on
    an AVX-512 host (whose VNNI also runs the ymm `vpdpbusd`)."""
    host = host_isa()
    if not (isa == host or (isa, host) == ("avx2", "avx512vbmi")):
        return False
    return not int_lut or host_vnni()


def spec_isa(spec: lk.KernelSpec) -> str:
    """The instruction set a q8 spec was made for (its row tile: 64 bytes AVX-512, 32 AVX2, 16 NEON)."""
    return {r: isa for isa, r in ISA_R.items()}[spec.R]


def padded_k(K: int, isa: str) -> int:
    """LUT entries per column: whole 64-entry tables, except 16 or 32 entries for small codebooks on AVX2 / NEON."""
    if isa != "avx512vbmi" and K <= 32:
        return 16 if K <= 16 else 32
    return 64 * math.ceil(K / 64)


def _vec(n, t=lc.F32):
    return ir.VectorType(t, n)


def _intrinsic(mod, name, ret, args):
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)


def _lookup(g: lc.Gen, isa: str, tables: list, c):
    """R int8 LUT entries selected by the R codes in `c` (<R x i8>) from Kp/64 tables of 64 entries."""
    b, mod = g.b, g.fn.module
    if isa == "avx512vbmi":
        v = _vec(64, lc.I8)
        if len(tables) == 1:
            return b.call(_intrinsic(mod, "llvm.x86.avx512.permvar.qi.512", v, [v, v]), [tables[0], c])
        p2 = _intrinsic(mod, "llvm.x86.avx512.vpermi2var.qi.512", v, [v, v, v])
        lo = b.call(p2, [tables[0], c, tables[1]])
        if len(tables) == 2:
            return lo
        if len(tables) == 3:  # Kp = 192: codes 128-191 index the third table by their low 6 bits (vpermb)
            hi = b.call(_intrinsic(mod, "llvm.x86.avx512.permvar.qi.512", v, [v, v]), [tables[2], c])
        else:
            hi = b.call(p2, [tables[2], c, tables[3]])
        return b.select(b.icmp_signed("<", c, ir.Constant(v, [0] * 64)), hi, lo)
    if isa == "avx2":
        v = _vec(32, lc.I8)
        shuf = _intrinsic(mod, "llvm.x86.avx2.pshuf.b", v, [v, v])
        if len(tables) == 1:  # codes < 16: bit 7 clear, the low nibble indexes the table
            return b.call(shuf, [tables[0], c])
        if AVX2_TREE:
            return _avx2_tree(g, tables, c)
        sat = _intrinsic(mod, "llvm.uadd.sat.v32i8", v, [v, v])
        bias = ir.Constant(v, [0x70] * 32)
        out = None
        for t, tab in enumerate(tables):  # table t: codes 16t..16t+15 -> 0x70..0x7f, the rest -> >= 0x80 (zero)
            idx = b.call(sat, [c if t == 0 else b.sub(c, ir.Constant(v, [16 * t] * 32)), bias])
            r = b.call(shuf, [tab, idx])
            out = r if out is None else b.or_(out, r)
        return out
    v = _vec(16, lc.I8)
    if len(tables) < 4:  # 16 or 32 entries: one tbl over one or two q registers
        n = len(tables)
        return b.call(_intrinsic(mod, f"llvm.aarch64.neon.tbl{n}.v16i8", v, [v] * (n + 1)), [*tables, c])
    tbl = _intrinsic(mod, "llvm.aarch64.neon.tbl4.v16i8", v, [v] * 5)
    tbx = _intrinsic(mod, "llvm.aarch64.neon.tbx4.v16i8", v, [v] * 6)
    quads = [tables[4 * q:4 * q + 4] for q in range(len(tables) // 4)]
    out = b.call(tbl, [*quads[0], c])
    for q, quad in enumerate(quads[1:], 1):
        out = b.call(tbx, [out, *quad, b.sub(c, ir.Constant(v, [64 * q] * 16))])
    return out


def _slot(g: lc.Gen, a, spec: lk.KernelSpec, tid):
    """Pointers into range `tid`'s scratch slot (layout: see `stride`)."""
    b, i64, JB, Kp, v = g.b, g.i64, spec.JB, spec.K, spec.vec_len
    n_vec = a.n(lk.A_NVEC)
    base = b.gep(a.p(lk.A_SCR), [b.mul(tid, a.n(lk.A_SSTRIDE))], source_etype=lc.I8)
    part = base  # f32 [n_rb * R]: this range's partial y (range 0 writes y itself)
    lut = b.gep(part, [b.mul(a.n(lk.A_NRB), i64(spec.R))], source_etype=lc.F32)  # f32 [JB][Kp]
    xq = b.gep(lut, [i64(JB * Kp)], source_etype=lc.F32)  # f32 [n_vec * v]
    xo = b.gep(xq, [b.mul(n_vec, i64(v))], source_etype=lc.F32)  # f32 [n_out]
    scales = b.gep(xo, [a.n(lk.A_NOUT)], source_etype=lc.F32)  # f32 [items of the range][G]
    return part, lut, xq, xo, scales


def _gen(mod, spec: lk.KernelSpec, isa: str):
    """q8_items(args, tid, i0, i1): items [i0, i1) of the S * n_blk (stage, column block) items, every row, into
    range tid's partial y. Splitting the columns (not the rows) between threads keeps each thread's code stream
    contiguous and builds every LUT once."""
    fn = ir.Function(mod, lc.WORK_TYPE, "q8_items")
    mod = fn.module
    g = lc.Gen(fn)
    b = g.b
    args, tid, i0, i1 = fn.args
    a = lk._Args(g, args)
    i64, JB, Kp, R = g.i64, spec.JB, spec.K, spec.R
    n_vec, G, n_rb = a.n(lk.A_NVEC), a.n(lk.A_GROUPS), a.n(lk.A_NRB)
    n_blk = lk.split_k_items(g, a, spec)[0]
    part, lut, xq, xo, scales = _slot(g, a, spec, tid)
    y = b.select(b.icmp_signed("==", tid, i64(0)), a.p(lk.A_Y), part)
    n_it = b.sub(i1, i0)
    lutq = b.gep(scales, [b.mul(n_it, G)], source_etype=lc.F32)  # i8 [items][G][JB][Kp]
    with g.loop(0, b.mul(n_rb, i64(R)), name="z") as r:
        g.store(lc.F32, ir.Constant(lc.F32, 0.0), y, r)
    lk._emit_prep_x(g, a, spec, xq, xo)

    def item_loop(body):
        with g.loop(i0, i1, name="it") as it:
            st, j0 = b.sdiv(it, n_blk), b.mul(b.srem(it, n_blk), i64(JB))
            jl = g.min(i64(JB), b.sub(n_vec, j0))
            with g.loop(0, G, name="grp") as grp:
                k = b.add(b.mul(b.sub(it, i0), G), grp)  # this LUT's index in the slot
                body(st, grp, b.add(b.mul(st, G), grp), j0, jl, k,
                     b.gep(lutq, [b.mul(k, i64(JB * Kp))], source_etype=lc.I8))

    # while the LUTs are built, the memory bus would idle: prefetch the range's first codes into L2 meanwhile
    # (BUILD_PREFETCH bytes per LUT column; the range's codes are one contiguous stream)
    c0 = _code_base(g, a, spec, b.sdiv(i0, n_blk), b.mul(b.srem(i0, n_blk), i64(JB)), i64(JB), i64(0))
    span = b.mul(b.mul(n_it, i64(JB // 2 if spec.nibbles else JB)), b.mul(n_rb, i64(R)))  # the range's bytes, at most
    pf = _intrinsic(mod, "llvm.prefetch.p0", lc.VOID, [lc.PTR, lc.I32, lc.I32, lc.I32])

    def build(st, grp, sg, j0, jl, k, lq):
        def each_column(jj):
            if not (BUILD_PREFETCH and isa != "neon"):
                return
            off = b.mul(b.add(b.mul(k, i64(JB)), jj), i64(BUILD_PREFETCH))
            with b.if_then(b.icmp_signed("<", off, span)):  # never past the range (small layers: no stray lines)
                for line in range(0, BUILD_PREFETCH, 64):
                    b.call(pf, [b.gep(c0, [b.add(off, i64(line))], source_etype=lc.I8), ir.Constant(lc.I32, 0),
                                ir.Constant(lc.I32, 2), ir.Constant(lc.I32, 1)])
        if spec.int_lut:  # bytes [S][G][Kp][4], then the S * G float32 codebook scales
            cb = b.gep(a.p(lk.A_CBT), [b.mul(sg, i64(4 * Kp))], source_etype=lc.I8)
            cb_scales = b.gep(a.p(lk.A_CBT), [b.mul(b.mul(i64(spec.stages), G), i64(4 * Kp))], source_etype=lc.I8)
            scale = _emit_lut_int(g, spec, isa, cb, g.load(lc.F32, cb_scales, sg), lut, lq, xq, j0, jl, each_column)
        else:
            cb = b.gep(a.p(lk.A_CBT), [b.mul(sg, i64(spec.vec_len * Kp))], source_etype=lc.F32)
            scale = _emit_lut_q8(g, spec, isa, cb, lut, lq, xq, j0, jl, each_column)
        g.store(lc.F32, scale, scales, k)
        if spec.nibbles:  # an odd block's last high nibbles (code 0) look up column jl: entries of value 0
            with b.if_then(b.icmp_signed("!=", b.srem(jl, i64(2)), i64(0))):
                with g.loop(b.mul(jl, i64(Kp)), b.mul(b.add(jl, i64(1)), i64(Kp)), name="ph") as e:
                    g.store(lc.I8, ir.Constant(lc.I8, BIAS), lq, e)

    def tiles(st, grp, sg, j0, jl, k, lq):
        scale = g.load(lc.F32, scales, k)
        lo, hi = lk._group_rows(g, a, spec, grp, i64(0), n_rb)
        U = AVX2_TILES_PER_PASS if isa == "avx2" and Kp > 16 else TILES_PER_PASS
        mid = b.sub(hi, b.srem(b.sub(hi, lo), i64(U)))
        with g.loop(lo, mid, step=U, name="rb") as rb:
            _emit_tile(g, a, spec, isa, st, lq, j0, jl, rb, scale, y, U)
        if U > 1:
            with g.loop(mid, hi, name="rt") as rb:
                _emit_tile(g, a, spec, isa, st, lq, j0, jl, rb, scale, y)

    item_loop(build)  # every LUT of the range first, so that the tile loops stream the codes without pauses
    item_loop(tiles)
    b.ret_void()
    return fn


def _emit_lut_q8(g: lc.Gen, spec: lk.KernelSpec, isa: str, cb_sg, lut, lutq, xq, j0, jl, each_column=None):
    """Float LUT of the block (tracking its max |entry|), then the int8 LUT; returns the block scale (max / QMAX).
    `each_column(jj)` emits extra work at the top of every column (the code prefetches)."""
    b, i64, v, Kp = g.b, g.i64, spec.vec_len, spec.K
    W = 16
    vw = _vec(W)
    mod = g.fn.module
    if isa == "avx512vbmi":  # vrangeps imm 11: max(|a|, |b|) with the sign cleared, one op for fabs + fmax
        rng = _intrinsic(mod, "llvm.x86.avx512.mask.range.ps.512", vw, [vw, vw, lc.I32, vw, lc.I16, lc.I32])
        absmax = lambda acc, m: b.call(rng, [acc, m, ir.Constant(lc.I32, 11), m, ir.Constant(lc.I16, -1),  # noqa: E731
                                             ir.Constant(lc.I32, 4)])
    else:
        fabs = _intrinsic(mod, f"llvm.fabs.v{W}f32", vw, [vw])
        absmax = lambda acc, m: g.fmax(b.call(fabs, [acc]), m)  # noqa: E731
    U = min(4, Kp // W)
    mx = [g.var(vw, init=ir.Constant(vw, [0.0] * W), name=f"mx{u}") for u in range(U)]  # U chains: maxps latency
    with g.loop(0, jl, name="lj") as jj:
        if each_column is not None:
            each_column(jj)
        xs = [g.splat(g.load(lc.F32, xq, b.add(b.mul(b.add(j0, jj), i64(v)), i64(t))), W) for t in range(v)]
        row = b.gep(lut, [b.mul(jj, i64(Kp))], source_etype=lc.F32)
        with g.loop(0, Kp, step=U * W, name="lk") as k0:  # Kp is a multiple of 64, or 16 / 32
            for u in range(U):
                k = b.add(k0, i64(u * W))
                acc = b.fmul(b.load(b.gep(cb_sg, [k], source_etype=lc.F32), typ=vw, align=4), xs[0])
                for t in range(1, v):
                    wp = b.gep(cb_sg, [b.add(k, i64(t * Kp))], source_etype=lc.F32)
                    acc = g.fma(b.load(wp, typ=vw, align=4), xs[t], acc)
                b.store(acc, b.gep(row, [k], source_etype=lc.F32), align=4)
                b.store(absmax(acc, b.load(mx[u], typ=vw)), mx[u])
    m = [b.load(t, typ=vw) for t in mx]
    while len(m) > 1:
        m = [g.fmax(m[i], m[i + 1]) if i + 1 < len(m) else m[i] for i in range(0, len(m), 2)]
    m = g.hmax(m[0])
    inv = g.splat(b.select(b.fcmp_ordered(">", m, ir.Constant(lc.F32, 0.0)),
                           b.fdiv(ir.Constant(lc.F32, float(QMAX)), m), ir.Constant(lc.F32, 0.0)), W)
    n_el = b.mul(jl, i64(Kp))
    ld = lambda i: b.fmul(b.load(b.gep(lut, [i], source_etype=lc.F32), typ=vw, align=4), inv)  # noqa: E731
    if isa == "avx512vbmi":  # 64 entries: 4 x cvtps2dq, packssdw x 2, packsswb (lane order undone by `_x86_order`)
        vi, vs, vb = _vec(W, lc.I32), _vec(32, lc.I16), _vec(64, lc.I8)
        cvt = _intrinsic(mod, "llvm.x86.avx512.mask.cvtps2dq.512", vi, [vw, vi, lc.I16, lc.I32])
        pdw = _intrinsic(mod, "llvm.x86.avx512.packssdw.512", vs, [vi, vi])
        pwb = _intrinsic(mod, "llvm.x86.avx512.packsswb.512", vb, [vs, vs])
        with g.loop(0, n_el, step=64, name="qz") as i:
            d = [b.call(cvt, [ld(b.add(i, i64(W * u))), ir.Constant(vi, [0] * W), ir.Constant(lc.I16, -1),
                              ir.Constant(lc.I32, 4)]) for u in range(4)]
            q = b.call(pwb, [b.call(pdw, [d[0], d[1]]), b.call(pdw, [d[2], d[3]])])
            b.store(b.xor(q, ir.Constant(vb, [BIAS] * 64)), b.gep(lutq, [i], source_etype=lc.I8), align=1)
    else:
        rint = _intrinsic(mod, f"llvm.rint.v{W}f32", vw, [vw])
        vb = _vec(W, lc.I8)
        with g.loop(0, n_el, step=W, name="qz") as i:
            q = b.fptosi(b.call(rint, [ld(i)]), vb)
            b.store(b.xor(q, ir.Constant(vb, [BIAS] * W)), b.gep(lutq, [i], source_etype=lc.I8), align=1)
    return b.fmul(m, ir.Constant(lc.F32, 1.0 / QMAX))


def _emit_lut_int(g: lc.Gen, spec: lk.KernelSpec, isa: str, cb, cb_scale, lut, lutq, xq, j0, jl, each_column=None):
    """The int8 LUT of the block in integers; returns the block scale. One generator for AVX-512 VNNI (`vpdpbusd`
    on zmm: 16 dot products an instruction), AVX-VNNI (`vpdpbusd` on ymm: 8) and the aarch64 dot product (`sdot`:
    4). A plain-PyTorch model of this arithmetic is the tests' `vnni_model`
    (tests/kernels/test_kernels_llvm_codebook.py).

    x: the block's jl * v inputs quantized to int8 (x8 = rint(x * 127 / max|x|), 4 bytes a column, zero padded).
    Codebook (`int_codebooks`): x86, u8 entries q + CB_BIAS (`vpdpbusd` multiplies unsigned by signed bytes), each
    column's dot products started from off = -CB_BIAS * sum(x8); aarch64, the signed entries q (`sdot`), from 0.
    Either way the exact int32 dot products d = x8 . q (|d| <= v * 127 * 127; halved, d >> 1, when that exceeds
    2**15 - 1, i.e. v >= 3) are packed to int16 (exact) into the block buffer while their max |d| = m is tracked.
    Then each d -> rint((d << sh) * M / 2**15) (`vpmulhrsw` / `sqrdmulh`, the same rounding) with sh the smallest
    shift that makes m << sh >= 128 and M = floor(127 * 2**15 / (m << sh)), so |q| <= 127, packed to bytes and
    biased. Block scale: 2**15 / (M * 2**sh) * 2**half * (max|x| / 127) * the codebook's scale (0 when m = 0).
    Entries land in codeword order: the codebook slots are in the order the packs undo (`int_slot_order`)."""
    b, i64, v, Kp, JB = g.b, g.i64, spec.vec_len, spec.K, spec.JB
    mod = g.fn.module
    L = INT_LANES[isa]  # int32 dot products per instruction; 4 of them make a chunk of C = 4 L entries
    C = 4 * L
    vi, vs, vb = _vec(L, lc.I32), _vec(2 * L, lc.I16), _vec(C, lc.I8)
    i32 = lc.I32
    lut16 = lut  # i16 [JB][Kp] (the float LUT's scratch)
    x8 = b.gep(lut, [i64(JB * Kp * 2)], source_etype=lc.I8)  # i8 [JB][4]
    offs = b.gep(x8, [i64(JB * 4)], source_etype=lc.I8)  # i32 [JB]
    xb = b.gep(xq, [b.mul(j0, i64(v))], source_etype=lc.F32)
    v4, vi4 = _vec(4), _vec(4, i32)
    fabs = _intrinsic(mod, "llvm.fabs.v4f32", v4, [v4])
    rint = _intrinsic(mod, "llvm.rint.v4f32", v4, [v4])
    radd = _intrinsic(mod, "llvm.vector.reduce.add.v4i32", i32, [vi4])
    bias = 0 if isa == "neon" else CB_BIAS

    def column(jj):  # the column's v inputs and 4 - v zeros (past the v inputs: read, never used)
        c = b.load(b.gep(xb, [b.mul(jj, i64(v))], source_etype=lc.F32), typ=v4, align=4)
        if v < 4:
            c = b.shuffle_vector(c, ir.Constant(v4, [0.0] * 4), ir.Constant(vi4, [t if t < v else 4 for t in range(4)]))
        return c

    xm = g.var(v4, ir.Constant(v4, [0.0] * 4), name="xm")
    with g.loop(0, jl, name="xa") as jj:
        b.store(g.fmax(b.call(fabs, [column(jj)]), b.load(xm, typ=v4)), xm)
    xmax = g.hmax(b.load(xm, typ=v4))
    pos = b.fcmp_ordered(">", xmax, ir.Constant(lc.F32, 0.0))
    inv = g.splat(b.select(pos, b.fdiv(ir.Constant(lc.F32, 127.0), xmax), ir.Constant(lc.F32, 0.0)), 4)
    with g.loop(0, jl, name="xq8") as jj:
        q = b.fptosi(b.call(rint, [b.fmul(column(jj), inv)]), vi4)
        g.store(i32, b.bitcast(b.trunc(q, _vec(4, lc.I8)), i32), x8, jj)
        g.store(i32, b.mul(b.call(radd, [q]), ir.Constant(i32, -bias)), offs, jj)
    if isa == "neon":
        sdot = _intrinsic(mod, "llvm.aarch64.neon.sdot.v4i32.v16i8", vi, [vi, vb, vb])
        dot = lambda acc, w, xw: b.call(sdot, [acc, w, b.bitcast(xw, vb)])  # noqa: E731
        cat = lambda t, u, n: b.shuffle_vector(t, u, ir.Constant(_vec(2 * n, i32), list(range(2 * n))))  # noqa: E731
        pack16 = lambda t, u: b.trunc(cat(t, u, L), vs)  # noqa: E731  (exact: |d| <= 2**15 - 1)
        pack8 = lambda t, u: b.trunc(cat(t, u, 2 * L), vb)  # noqa: E731  (exact: |q| <= 127)
        mulhrs = _intrinsic(mod, "llvm.aarch64.neon.sqrdmulh.v8i16", vs, [vs, vs])
    else:
        w = 512 if isa == "avx512vbmi" else 256
        dp = _intrinsic(mod, f"llvm.x86.avx512.vpdpbusd.{w}", vi, [vi, vi, vi])
        dot = lambda acc, cw, xw: b.call(dp, [acc, b.bitcast(cw, vi), xw])  # noqa: E731
        pfx = "avx512" if w == 512 else "avx2"
        pdw = _intrinsic(mod, f"llvm.x86.{pfx}.packssdw{'.512' if w == 512 else ''}", vs, [vi, vi])
        pwb = _intrinsic(mod, f"llvm.x86.{pfx}.packsswb{'.512' if w == 512 else ''}", vb, [vs, vs])
        pack16 = lambda t, u: b.call(pdw, [t, u])  # noqa: E731
        pack8 = lambda t, u: b.call(pwb, [t, u])  # noqa: E731
        mulhrs = _intrinsic(mod, f"llvm.x86.{pfx}.pmul.hr.sw{'.512' if w == 512 else ''}", vs, [vs, vs])
    absw = _intrinsic(mod, f"llvm.abs.v{2 * L}i16", vs, [vs, lc.I1])
    umax = _intrinsic(mod, f"llvm.umax.v{2 * L}i16", vs, [vs, vs])
    mx = [g.var(vs, ir.Constant(vs, [0] * (2 * L)), name=f"mq{h}") for h in range(2)]
    half = int(v * QMAX * CB_QMAX > 32767)
    with g.loop(0, jl, name="lj") as jj:
        if each_column is not None:
            each_column(jj)
        xw = g.splat(g.load(i32, x8, jj), L)  # x8 [JB][4] read as one i32 per column
        off = g.splat(g.load(i32, offs, jj), L)
        row = b.gep(lut16, [b.mul(jj, i64(Kp))], source_etype=lc.I16)
        for u in range(Kp // C):
            acc = [dot(off, b.load(b.gep(cb, [i64(4 * (C * u + L * i))], source_etype=lc.I8), typ=vb, align=4), xw)
                   for i in range(4)]
            if half:  # |x8 . q| <= v * 127 * 127: halved so that the int16 packs are exact
                acc = [b.ashr(t, ir.Constant(vi, [1] * L)) for t in acc]
            for h in range(2):
                wv = pack16(acc[2 * h], acc[2 * h + 1])
                b.store(wv, b.gep(row, [i64(C * u + 2 * L * h)], source_etype=lc.I16), align=2)
                b.store(b.call(umax, [b.load(mx[h], typ=vs), b.call(absw, [wv, ir.Constant(lc.I1, 0)])]), mx[h])
    red = _intrinsic(mod, f"llvm.vector.reduce.umax.v{2 * L}i16", lc.I16, [vs])
    m = b.zext(b.call(red, [b.call(umax, [b.load(mx[0], typ=vs), b.load(mx[1], typ=vs)])]), i32)
    ctlz = _intrinsic(mod, "llvm.ctlz.i32", i32, [i32, lc.I1])
    sh = b.sub(b.call(ctlz, [m, ir.Constant(lc.I1, 0)]), ir.Constant(i32, 24))  # m << sh in [128, 256) if m < 128
    sh = b.select(b.icmp_signed(">", sh, ir.Constant(i32, 0)), sh, ir.Constant(i32, 0))
    nz = b.icmp_unsigned("!=", m, ir.Constant(i32, 0))
    den = b.select(nz, b.shl(m, sh), ir.Constant(i32, 1))
    M = b.select(nz, b.udiv(ir.Constant(i32, 127 << 15), den), ir.Constant(i32, 0))
    shv, Mv = g.splat(b.trunc(sh, lc.I16), 2 * L), g.splat(b.trunc(M, lc.I16), 2 * L)
    with b.if_else(b.icmp_signed("==", sh, ir.Constant(i32, 0))) as (unshifted, shifted):  # m >= 128: no shift
        for blk, shift in ((unshifted, False), (shifted, True)):
            with blk:
                with g.loop(0, b.mul(jl, i64(Kp)), step=C, name="qz") as i:
                    wv = [b.load(b.gep(lut16, [b.add(i, i64(2 * L * h))], source_etype=lc.I16), typ=vs, align=2)
                          for h in range(2)]
                    q = [b.call(mulhrs, [b.shl(t, shv) if shift else t, Mv]) for t in wv]
                    b.store(b.xor(pack8(*q), ir.Constant(vb, [BIAS] * C)), b.gep(lutq, [i], source_etype=lc.I8),
                            align=1)
    step = b.fdiv(ir.Constant(lc.F32, float(1 << 15)), b.fmul(b.uitofp(M, lc.F32), b.uitofp(b.shl(
        ir.Constant(i32, 1), sh), lc.F32)))
    scale = b.fmul(b.fmul(step, b.fmul(xmax, ir.Constant(lc.F32, (1 << half) / 127))), cb_scale)
    return b.select(nz, scale, ir.Constant(lc.F32, 0.0))


def _code_base(g: lc.Gen, a, spec: lk.KernelSpec, s, j0, jl, rb):
    """Codes of tile rb in the block of columns [j0, j0 + jl) of stage s (nibbles: half the bytes)."""
    if not spec.nibbles:
        return lk._code_base(g, a, spec, s, j0, jl, rb)
    b, i64 = g.b, g.i64
    half = lambda n: b.sdiv(b.add(n, i64(1)), i64(2))  # noqa: E731
    nrb_r = b.mul(a.n(lk.A_NRB), i64(spec.R))
    off = b.add(b.mul(s, b.mul(nrb_r, half(a.n(lk.A_NVEC)))), b.mul(b.sdiv(j0, i64(2)), nrb_r))
    off = b.add(off, b.mul(b.mul(rb, half(jl)), i64(spec.R)))
    return b.gep(a.p(lk.A_CODES), [off], source_etype=lc.I8)


def _x86_order(Kp: int) -> torch.Tensor:
    """Codeword held by each float LUT slot on x86, so that the in-lane packs (packssdw, packsswb) of four 16-float
    vectors emit the 64 int8 entries in codeword order: slot 16m + 4l + i holds codeword 16l + 4m + i."""
    s = torch.arange(Kp)
    base, r = s - s % 64, s % 64
    m, l, i = r // 16, (r // 4) % 4, r % 4
    return base + 16 * l + 4 * m + i


def int_slot_order(Kp: int, isa: str) -> torch.Tensor:
    """Codeword held by each slot of an integer codebook: the int32 dot products of 4 vectors (L lanes each) are
    packed to int16 and then to bytes by in-lane packs (x86: `packssdw`, `packsswb`; 4 lanes of 128 bits on zmm, 2
    on ymm), which interleave them by 4; slot 4Lm + 4l + i (vector m, 128-bit lane l) holds codeword 16l + 4m + i
    of its chunk of 4L, so that the entries come out in codeword order. AVX-512: `_x86_order`; NEON packs in
    order (identity)."""
    if isa == "neon":
        return torch.arange(Kp)
    lanes = INT_LANES[isa] // 4
    s = torch.arange(Kp)
    chunk = 16 * lanes
    base, r = s - s % chunk, s % chunk
    m, lane, i = r // (4 * lanes), (r // 4) % lanes, r % 4
    return base + 16 * lane + 4 * m + i


def int_codebooks(cbt: torch.Tensor, bias: int = CB_BIAS) -> torch.Tensor:
    """Integer codebooks: float32 [S, G, v, Kp] (slot order) -> one uint8 tensor: [S][G][Kp][4] bytes q + bias
    (x86: CB_BIAS, the unsigned operand of `vpdpbusd`; aarch64: 0, the signed bytes of `sdot`) with q = round(entry
    / scale) (|q| <= CB_QMAX; vec_len padded to 4 with zeros), then [S][G] float32 scales (max |entry| / CB_QMAX; 1
    for an all-zero codebook)."""
    S, G, v, Kp = cbt.shape
    sc = cbt.abs().amax(dim=(2, 3)) / CB_QMAX
    sc = torch.where(sc > 0, sc, torch.ones_like(sc)).float()
    q = torch.round(cbt / sc[..., None, None]).clamp(-CB_QMAX, CB_QMAX).to(torch.int32)
    q = ((torch.nn.functional.pad(q.transpose(2, 3), (0, 4 - v)) + bias) & 255).to(torch.uint8)
    return torch.cat([q.reshape(-1), sc.reshape(-1).view(torch.uint8)]).contiguous()


def _avx2_tree(g: lc.Gen, tables: list, c):
    """AVX2 lookup of Kp = 16 n entries (n tables of 16): every table looked up by the low nibble (`vpshufb`),
    then a binary tree of byte blends (`vpblendvb`) keyed by code bits 4, 5, ... picks the code's table:
    n shuffles + n - 1 blends + one shift per tree level (K = 256: 16 + 15 + 4, against 64 for the saturating
    per-table form; Zen 3, session 21, one tile per pass: K = 256 4096² 1.2x faster than that form, bit-identical)."""
    b, mod = g.b, g.fn.module
    v, vw = _vec(32, lc.I8), _vec(16, lc.I16)
    shuf = _intrinsic(mod, "llvm.x86.avx2.pshuf.b", v, [v, v])
    blend = _intrinsic(mod, "llvm.x86.avx2.pblendvb", v, [v, v, v])
    lo = b.and_(c, ir.Constant(v, [15] * 32))
    levels = max(0, math.ceil(math.log2(len(tables))))
    masks = {}

    def mask(bit):  # code bit `bit` moved to bit 7 of its byte (the bit vpblendvb reads): a 16-bit shift left
        if bit not in masks:
            sh = 7 - bit
            masks[bit] = c if sh == 0 else b.bitcast(b.shl(b.bitcast(c, vw), ir.Constant(vw, [sh] * 16)), v)
        return masks[bit]

    def select(ts, n_bits):
        if n_bits == 0:
            return b.call(shuf, [ts[0], lo])
        half = 1 << (n_bits - 1)
        low = select(ts[:half], n_bits - 1)
        if len(ts) <= half:  # codes never reach the missing upper half (K is padded to whole tables only)
            return low
        return b.call(blend, [low, select(ts[half:], n_bits - 1), mask(3 + n_bits)])

    return select(tables, levels)


def _emit_tile(g: lc.Gen, a, spec: lk.KernelSpec, isa: str, s, lutq, j0, jl, rb, scale, y, n_tiles: int = 1):
    """y[tiles rb .. rb + n_tiles - 1] += scale * sum over the block's columns of LUTq[j][code] (int16
    accumulation). The tiles of one pass share each column's table loads."""
    b, i64, R, Kp = g.b, g.i64, spec.R, spec.K
    H = R // 2
    vb, vh = _vec(R, lc.I8), _vec(H, lc.I16)
    width = 64 if isa == "avx512vbmi" else 16  # table entries per register (AVX2: one per 128-bit lane)
    n_tab = Kp // width
    tv = _vec(width, lc.I8)
    lanes = (lambda t: b.shuffle_vector(t, t, ir.Constant(_vec(32, lc.I32), list(range(16)) * 2))) \
        if isa == "avx2" else (lambda t: t)
    cbase = _code_base(g, a, spec, s, j0, jl, rb)  # tile rb + u starts u * jl * R bytes later (nibbles: jl/2)
    nib = spec.nibbles
    per_tile = b.sdiv(b.add(jl, i64(1)), i64(2)) if nib else jl  # R-byte vectors per tile of the block
    acc = [[g.var(vh, name=f"acc{u}_{h}") for h in range(2)] for u in range(n_tiles)]
    zero = ir.Constant(vh, [0] * H)
    for u in range(n_tiles):
        for h in range(2):
            b.store(zero, acc[u][h])
    eight = ir.Constant(vh, [8] * H)
    # biased entries u = q + 128 in 0..255: acc0 = sum of whole words (lo + 256 hi, mod 2**16), acc1 = sum of the
    # high bytes; the low bytes' sum is acc0 - 256 acc1 (both sums <= JB * 255 < 2**15). 3 ops per vector, not 5.
    pf = _intrinsic(g.fn.module, "llvm.prefetch.p0", lc.VOID, [lc.PTR, lc.I32, lc.I32, lc.I32])

    def tables(col):
        tp = b.gep(lutq, [b.mul(col, i64(Kp))], source_etype=lc.I8)
        return [lanes(b.load(b.gep(tp, [i64(width * t)], source_etype=lc.I8), typ=tv, align=1)) for t in range(n_tab)]

    def add(u, w):
        w = b.bitcast(w, vh)
        b.store(b.add(b.load(acc[u][0], typ=vh), w), acc[u][0])
        b.store(b.add(b.load(acc[u][1], typ=vh), b.lshr(w, eight)), acc[u][1])

    nib_mask = ir.Constant(vb, [15] * R)
    with g.loop(0, per_tile, name="jj") as jj:
        tabs = tables(b.mul(jj, i64(2)) if nib else jj)
        tabs_hi = tables(b.add(b.mul(jj, i64(2)), i64(1))) if nib else None
        for u in range(n_tiles):
            cp = b.gep(cbase, [b.mul(b.add(b.mul(per_tile, i64(u)), jj), i64(R))], source_etype=lc.I8)
            if PREFETCH and isa != "neon":  # x86: ahead of every tile (NEON tiles are 16 bytes: left to the hardware)
                b.call(pf, [b.gep(cp, [i64(PREFETCH)], source_etype=lc.I8), ir.Constant(lc.I32, 0),
                            ir.Constant(lc.I32, PREFETCH_LOCALITY), ir.Constant(lc.I32, 1)])
            c = b.load(cp, typ=vb, align=1)
            if nib:
                add(u, _lookup(g, isa, tabs, b.and_(c, nib_mask)))
                add(u, _lookup(g, isa, tabs_hi, b.lshr(c, ir.Constant(vb, [4] * R))))
            else:
                add(u, _lookup(g, isa, tabs, c))
    vi, vf = _vec(H, lc.I32), _vec(H)
    sc = g.splat(scale, H)
    looked = b.mul(per_tile, i64(2)) if nib else jl  # lookups per row (an odd block's zero table included)
    bias = g.splat(b.trunc(b.mul(looked, i64(BIAS)), lc.I16), H)
    for u in range(n_tiles):
        hi = b.load(acc[u][1], typ=vh)
        sums = [b.sub(b.sub(b.load(acc[u][0], typ=vh), b.shl(hi, eight)), bias), b.sub(hi, bias)]
        for h in range(2):
            yp = b.gep(y, [b.add(b.mul(b.add(rb, i64(u)), i64(R)), i64(h * H))], source_etype=lc.F32)
            t = b.sitofp(b.sext(sums[h], vi), vf)
            b.store(g.fma(t, sc, b.load(yp, typ=vf, align=4)), yp, align=4)


def make_spec(vec_len: int, K: int, stages: int, rows_per_group: int, grouped: bool,
              isa: str | None = None, vnni: bool | None = None) -> lk.KernelSpec | None:
    """`vnni`: build the LUT in integers (`_emit_lut_int`; vec_len <= 4, and on AVX2 whole 32-entry tables, K > 16);
    default: on this host when it has the int8 dot product and `VNNI` allows (never for an explicit `isa`)."""
    if vnni is None:
        vnni = VNNI and isa is None and host_vnni()
    isa = isa or host_isa()
    if isa is None or K > 256:
        return None
    R = ISA_R[isa]
    if grouped and rows_per_group % R:
        return None
    JB = max(4, JB_INPUTS // vec_len)
    nibbles = K <= 16
    Kp = padded_k(K, isa)
    int_lut = bool(vnni) and vec_len <= 4 and Kp % (4 * INT_LANES[isa]) == 0
    return lk.KernelSpec(vec_len, padded_k(K, isa), 1, R, JB + JB % 2 if nibbles else JB, stages, 16, 1, nibbles,
                         int_lut)


def build_module(spec: lk.KernelSpec, isa: str, triple: str | None = None):
    mod = lc.new_module(f"codebook_q8_{isa}_{spec.vec_len}_{spec.K}", triple)
    def part_xo(g, a, t):
        part, _, _, xo, _ = _slot(g, a, spec, t)
        return part, xo

    lk.emit_split_k_top(mod, spec, lc.add_parallel_for(mod, _gen(mod, spec, isa)), "q8_work_par", part_xo)
    return mod


@functools.cache
def compiled(spec: lk.KernelSpec):
    """The JIT-compiled kernel of `spec` for this host (an AVX-512 host also runs the AVX2 specs: tests, A/B)."""
    isa = spec_isa(spec)
    if not runs_here(isa, spec.int_lut):
        raise ConfigError(f"the q8 kernel for {isa}{' with the integer LUT build' if spec.int_lut else ''} does "
                          f"not run on this host (its int8 LUT ISA: {host_isa()}, integer build: {host_vnni()})",
                          hint="pack the weight without isa= / vnni= to get this host's kernel")
    return lk._PAR_T(lc.jit(build_module(spec, isa), ["q8_work_par"])["q8_work_par"])


def repack_codes(codes: torch.Tensor, code_bits: int, n_vec: int, spec: lk.KernelSpec) -> torch.Tensor:
    """Stored codes -> the float32 kernels' tile layout with rows interleaved inside each R-byte vector."""
    flat = lk.repack_codes(codes, code_bits, n_vec, spec)
    R = spec.R
    p = torch.arange(R)
    order = p // 2 + (R // 2) * (p % 2)  # byte p <- row order[p] of the tile
    flat = flat.view(-1, R)[:, order].reshape(flat.shape).contiguous()
    if not spec.nibbles:
        return flat
    S, n_rb = codes.shape[0], math.ceil(codes.shape[1] / R)
    per_stage = flat.view(S, -1)
    out, off = [], 0
    for j0 in range(0, n_vec, spec.JB):  # each block: [n_rb][jl][R] -> [n_rb][ceil(jl/2)][R], column 2p low
        jl = min(spec.JB, n_vec - j0)
        blk = per_stage[:, off:off + n_rb * jl * R].reshape(S, n_rb, jl, R)
        off += n_rb * jl * R
        if jl % 2:
            blk = torch.nn.functional.pad(blk, (0, 0, 0, 1))
        out.append((blk[:, :, 0::2] | (blk[:, :, 1::2] << 4)).reshape(S, -1))
    return torch.cat(out, 1).contiguous()


def pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits,
                isa: str | None = None, vnni: bool | None = None) -> lk.Packed | None:
    stages, out_f, _ = codes.shape
    groups, K = codebooks.shape[1], codebooks.shape[2]
    spec = make_spec(vec_len, K, stages, out_f // groups, groups > 1, isa, vnni)
    base = lk.pack_weight(codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)
    if spec is None or base is None:
        return None
    cbt = torch.nn.functional.pad(base.cbt, (0, spec.K - K))  # [S, G, v, Kp]
    isa = spec_isa(spec)
    if spec.int_lut:
        cbt = int_codebooks(cbt[..., int_slot_order(spec.K, isa)], 0 if isa == "neon" else CB_BIAS)
    else:
        cbt = (cbt[..., _x86_order(spec.K)] if isa == "avx512vbmi" else cbt).contiguous()
    return lk.Packed(spec, repack_codes(codes, code_bits, base.n_vec, spec), cbt, base.perm, base.ow, base.scale,
                     base.bias, out_f, in_features, base.n_out, base.n_vec, groups, math.ceil(out_f / spec.R))


def items(p: lk.Packed) -> int:
    """(stage, column block) work items; threads take contiguous ranges of them."""
    return p.spec.stages * math.ceil(p.n_vec / p.spec.JB)


def stride(p: lk.Packed, n_threads: int) -> int:
    """Scratch bytes per range: partial y, float LUT of one block, permuted x, outlier x, then the block scales
    and int8 LUTs of the range's items (every group)."""
    JB, Kp = p.spec.JB, p.spec.K
    n_it = math.ceil(items(p) / max(1, min(n_threads, items(p)))) * p.groups
    n = 4 * (p.n_rb * p.spec.R + JB * Kp + p.n_vec * p.spec.vec_len + p.n_out + n_it) + n_it * JB * Kp + 64
    return n + (-n % 64)


def gemv(p: lk.Packed, x: torch.Tensor, n_threads: int | None = None, lead: tuple = ()) -> torch.Tensor:
    return lk.launch(p, lk.gemv_fn(p, compiled), x, stride, n_threads, lead)
