"""Few-input codebook GEMM (2..`max_rows` inputs: speculative-decoding verify trees, short chunks) on CPU,
llvmlite-generated (x86 AVX2 / AVX-512, aarch64 NEON from one generator), float32, equal to
`codebook_gemm_reference` up to summation order.

The prefill LUT GEMM (`llvm_codebook.gemm`) builds the whole lookup table for a tile of 8 inputs however few
there are, and every thread builds all of it when the batch is one tile: on a 576x576 layer with 256 codewords
it stores K = 256 LUT entries per code column and input, more work than the 576 rows' lookups it serves; the
dequantizing path pays a full float32 weight per call. With a handful of inputs neither is worth it: this kernel
decodes the codewords in registers instead and multiplies them with every input directly.

Per RU output rows (`row_unroll`: on AVX2's 16 vector registers 2, 4 for one input, 1 for tiles of more than 6
inputs, whose accumulators fill them; on AVX-512's and NEON's 32, 4 up to 6 inputs, else 2; rows of a row tile,
row tiles split over the threads) and tile of TT <= `TT_MAX` inputs
(compile-time, so the RU * TT accumulators stay in registers): for every P code vectors (P = codes per SIMD vector: the largest
power of two with P * vec_len <= lanes dividing JB and n_vec, e.g. 2 for vec_len 4 on AVX2), the RU rows' codes
of a column are one load (adjacent in the repacked layout) split with shifts, each row's P codewords (summed over
residual stages) are loaded from the float32 codebook ``cbk[s][g][k][0:v]`` (K * v floats per group,
L1-resident) and concatenated into one vector w_u, then acc[u][t] += w_u * x[t][j*v : (j+P)*v] (each x load
serves the RU rows). A row's sums are the lanes' sums of its accumulators; scale and bias are applied in the
kernel. Per P*v weights and RU rows: P code loads, RU*P codeword loads, TT x loads, RU*TT FMAs -- so 2..12
inputs cost 1.3-3x one batch-1 call, not 2-12x.

Measured on 2 AVX2 cores (Zen 3; `python benchmarks/kernels.py --only few`, all peers interleaved in one run),
smollm2's four shapes, 2 / 5 / 8 / 12 inputs: 1.05-2.8x (1 thread) and 1.6-4.3x (2 threads) faster than the
better of the LUT GEMM and the dequantizing path (what "auto" ran before), 1.8-6.0x faster than the float32 gemv
called once per input, 1.3-2.7x faster than the fp32 model's few-row `F.linear`; at 16 and 24 inputs 1.03-2.3x
ahead on 2 threads but 0.65-1.4x on one (the LUT GEMM overtakes it on the larger layers), hence `max_rows`.

Panel GEMM (`gemm(panel=True)`, prefill mode "panel"; what "auto" picks past `max_rows` inputs where its cost
model finds it cheaper than the LUT GEMM and the dequantizing path -- layers with few rows): the same kernel, but
each row tile's R rows are first decoded once into a float32 [R][in] tile in the thread's scratch (L1 / L2), and
tiles of PANEL_TT = 6 inputs read it (2 rows x 6 inputs on AVX2: 12 accumulators, each x load serving 2 rows and
each weight load 6 inputs; 4 rows x 6 inputs, 24 accumulators, on the 32-register ISAs; PANEL_UNROLL column steps
per iteration): the decoding is paid once per weight, not once per input
tile. At 64 tokens on 2 AVX2 threads 1.2-1.5x the LUT GEMM / dequantizing path on smollm2's smaller layers,
0.8-1.1x oneDNN's fp32 `F.linear` on the same shape.

Codes are read from the float32 kernels' repacked layout (`llvm_codebook.Packed.codes_r`): no further copy of the
weight. Codebooks in ``[s][g][k][t]`` float32 (cached per weight, a few KB). More than TT_MAX inputs run as
several equal tiles of at most TT_MAX; a last, partial tile reads its missing inputs as its last one and stores
only the inputs there are (no padded copy of x or y). Outlier columns: `llvm_codebook.finish` (torch), before scale
and bias.
"""
from __future__ import annotations

import functools
import math

import torch

from . import llvm_codebook as lk
from . import llvm_common as lc

ir = lc.ir
MAX_ROWS = 12  # inputs routed here by `llvm_codebook.prefill_choice` ("auto", `max_rows`)
TT_MAX = 8  # inputs per tile (accumulator registers: TT_MAX + the codeword vector + temporaries <= 16 on AVX2)
PANEL_TT = 6  # inputs per tile with a decoded panel (2 or 4 rows x 6 inputs: 12 / 24 accumulators + weights + x)
PANEL_UNROLL = 2  # column steps per loop iteration with a panel (measured ~1.1x over 1 on AVX2; 4 no better)
PANEL_X_BYTES = 320 << 10  # inputs per block of the panel GEMM: their x stays in L2 while every row tile streams it


def codes_per_vector(spec: lk.KernelSpec, n_vec: int, lanes: int) -> int:
    """P: code vectors per SIMD vector -- the largest power of two with P * vec_len <= lanes that divides both the
    column block JB and n_vec (so that no block has a remainder), at least 1."""
    P = 1
    while 2 * P * spec.vec_len <= lanes and spec.JB % (2 * P) == 0 and n_vec % (2 * P) == 0:
        P *= 2
    return P


def _concat(b, vs):
    """<v x float> values -> one <len(vs) * v x float> (a shuffle tree)."""
    while len(vs) > 1:
        n = vs[0].type.count
        mask = ir.Constant(ir.VectorType(lc.I32, 2 * n), list(range(2 * n)))
        vs = [b.shuffle_vector(vs[i], vs[i + 1], mask) for i in range(0, len(vs), 2)]
    return vs[0]


def row_unroll(spec: lk.KernelSpec, TT: int, regs: int = 16) -> int:
    """Rows computed together (sharing the x loads; RU * TT accumulators), what `regs` vector registers hold: with
    16 (AVX2) 4 for one input, 2 up to 6 inputs, else 1; with 32 (AVX-512, NEON) 4 up to 6 inputs, else 2 (measured
    on an AVX-512 Zen 5, smollm2's shapes, interleaved: 2-12 inputs 0.94-1.5x the 16-register choice, mostly
    1.05-1.35x, the panel GEMM at 64 tokens 1.01-1.21x; 8 rows for 2-3 inputs no better); at most what divides R."""
    if regs >= 32:
        ru = 4 if TT <= 6 else 2
    else:
        ru = 4 if TT == 1 else 2 if TT <= 6 else 1
    while spec.R % ru:
        ru //= 2
    return ru


def _gen_few(mod, spec: lk.KernelSpec, P: int, TT: int, panel: bool = False, regs: int = 16):
    """work(args, tid, rb0, rb1): rows of row tiles [rb0, rb1) x all input tiles.

    args: A_X = x [A_ROWS][n_vec * v] (the quantized columns, permuted, padded); A_CBT = cbk [S][G][K][v];
    A_Y = y [A_ROWS][out] (rows >= out are not stored); A_SCALE / A_BIAS: applied when not null; A_NBT =
    n_tiles, A_ROWS = the inputs (x rows); the rest as `llvm_codebook.Packed.static_args`. panel: each row tile's
    R rows are first decoded into the thread's scratch (A_SCR + tid * A_SSTRIDE: [R][n_vec * v] float32), which
    every input tile then reads."""
    fn = ir.Function(mod, lc.WORK_TYPE, "few_work")
    g = lc.Gen(fn)
    b = g.b
    args, tid, rb0, rb1 = fn.args
    a = lk._Args(g, args)
    v, K, R, JB, S = spec.vec_len, spec.K, spec.R, spec.JB, spec.stages
    RU = row_unroll(spec, TT, regs)
    W = P * v
    cbits = 8 * spec.code_bytes
    wide = ir.IntType(cbits * RU)
    vt, cvt = ir.VectorType(lc.F32, W), ir.VectorType(lc.F32, v)
    n_vec, G = a.n(lk.A_NVEC), a.n(lk.A_GROUPS)
    xs = b.mul(n_vec, g.i64(v))  # floats per input row
    out = a.n(lk.A_OUT)
    rpg, x0, y0, cbk = a.n(lk.A_RPG), a.p(lk.A_X), a.p(lk.A_Y), a.p(lk.A_CBT)
    scale, bias = a.p(lk.A_SCALE), a.p(lk.A_BIAS)
    accs = [[g.var(vt, name=f"acc{u}_{t}") for t in range(TT)] for u in range(RU)]
    zero = ir.Constant(vt, [0.0] * W)
    n_rows = a.n(lk.A_ROWS)

    def store_rows(rows, tt):  # y[tt * TT + t][r] = scale[r] * sum(acc[u][t]) + bias[r] for the inputs t there are
        yt = b.gep(y0, [b.mul(b.mul(tt, g.i64(TT)), out)], source_etype=lc.F32)
        left = b.sub(n_rows, b.mul(tt, g.i64(TT)))  # inputs in this tile: TT but in the last
        for u, r in enumerate(rows):
            with b.if_then(b.icmp_signed("<", r, out)):
                sc = g.load_or(lc.F32, scale, r, ir.Constant(lc.F32, 1.0))
                bi = g.load_or(lc.F32, bias, r, ir.Constant(lc.F32, 0.0))
                for t in range(TT):
                    s_ = g.reduce_add(b.load(accs[u][t], typ=vt))
                    y_ = b.fadd(b.fmul(s_, sc), bi)
                    if t == 0:  # every tile has its first input
                        g.store(lc.F32, y_, yt, r)
                    else:
                        with b.if_then(b.icmp_signed("<", g.i64(t), left)):
                            g.store(lc.F32, y_, yt, b.add(b.mul(g.i64(t), out), r))

    def x_rows(tt):  # the TT input rows of tile tt; past the last input, the last one again (its sums not stored)
        return [b.gep(x0, [b.mul(g.min(b.add(b.mul(tt, g.i64(TT)), g.i64(t)), b.sub(n_rows, g.i64(1))), xs)],
                      source_etype=lc.F32) for t in range(TT)]

    def fmas(ws, xt, col):  # acc[u][t] += w_u * x[t][col : col + W]
        for t in range(TT):
            xv = b.load(b.gep(xt[t], [col], source_etype=lc.F32), typ=vt, align=4)
            for u in range(RU):
                b.store(g.fma(ws[u], xv, b.load(accs[u][t], typ=vt)), accs[u][t])

    def zero_accs():
        for u in range(RU):
            for t in range(TT):
                b.store(zero, accs[u][t])

    if panel:  # per block of input tiles (PANEL_X_BYTES of x) and row tile: decode the row tile, then per input tile
        # (its x stays in L1) every pair of its rows
        pan = b.gep(a.p(lk.A_SCR), [b.mul(tid, a.n(lk.A_SSTRIDE))], source_etype=lc.I8)
        n_bt = a.n(lk.A_NBT)
        per = g.max(b.sdiv(g.i64(PANEL_X_BYTES // (4 * TT)), xs), g.i64(1))  # input tiles per block
        with g.loop(0, n_bt, step=per, name="tb") as tb0, g.loop(rb0, rb1, name="rb") as rb:
            _emit_panel(g, a, spec, pan, rb, xs)
            with g.loop(tb0, g.min(b.add(tb0, per), n_bt), name="tt") as tt:
                xt = x_rows(tt)
                with g.loop(0, R, step=RU, name="i") as i:
                    zero_accs()
                    prow = [b.gep(pan, [b.mul(b.add(i, g.i64(u)), xs)], source_etype=lc.F32) for u in range(RU)]
                    step = lambda c: fmas([b.load(b.gep(pr, [c], source_etype=lc.F32), typ=vt, align=4)  # noqa: E731
                                           for pr in prow], xt, c)
                    main = b.sub(xs, b.srem(xs, g.i64(PANEL_UNROLL * W)))
                    with g.loop(0, main, step=PANEL_UNROLL * W, name="pc") as col:
                        for q in range(PANEL_UNROLL):
                            step(b.add(col, g.i64(q * W)))
                    with g.loop(main, xs, step=W, name="pcr") as col:
                        step(col)
                    store_rows([b.add(b.mul(rb, g.i64(R)), b.add(i, g.i64(u))) for u in range(RU)], tt)
        b.ret_void()
        return fn
    with g.loop(rb0, rb1, name="rb") as rb:
        with g.loop(0, R, step=RU, name="i") as i:
            rows = [b.add(b.mul(rb, g.i64(R)), b.add(i, g.i64(u))) for u in range(RU)]
            cb_s = []
            for r in rows:
                grp = g.min(b.sdiv(r, rpg), b.sub(G, g.i64(1)))  # padded rows (code 0) read the last group
                cb_s.append([b.gep(cbk, [b.mul(b.add(b.mul(g.i64(s), G), grp), g.i64(K * v))], source_etype=lc.F32)
                             for s in range(S)])
            with g.loop(0, a.n(lk.A_NBT), name="tt") as tt:
                xt = x_rows(tt)
                zero_accs()
                with g.loop(0, n_vec, step=JB, name="jb") as j0:
                    jl = g.min(g.i64(JB), b.sub(n_vec, j0))
                    cbs = [b.gep(lk._code_base(g, a, spec, g.i64(s), j0, jl, rb), [i], source_etype=spec.ctype)
                           for s in range(S)]
                    with g.loop(0, jl, step=P, name="jj") as jj:
                        parts = [[[] for _ in range(S)] for _ in range(RU)]
                        for s in range(S):
                            for q in range(P):
                                # the RU rows' codes of one column are adjacent: one load, split with shifts
                                cp = b.gep(cbs[s], [b.mul(b.add(jj, g.i64(q)), g.i64(R))], source_etype=spec.ctype)
                                raw = b.load(cp, typ=wide, align=1)
                                for u in range(RU):
                                    c = b.trunc(b.lshr(raw, ir.Constant(wide, u * cbits)) if u else raw, spec.ctype)
                                    wp = b.gep(cb_s[u][s], [b.mul(b.zext(c, lc.I64), g.i64(v))], source_etype=lc.F32)
                                    parts[u][s].append(b.load(wp, typ=cvt, align=4))
                        ws = []
                        for u in range(RU):
                            w = None
                            for s in range(S):
                                wv = _concat(b, parts[u][s])
                                w = wv if w is None else b.fadd(w, wv)
                            ws.append(w)
                        fmas(ws, xt, b.mul(b.add(j0, jj), g.i64(v)))
                store_rows(rows, tt)
    b.ret_void()
    return fn


def _emit_panel(g: lc.Gen, a, spec: lk.KernelSpec, pan, rb, xs) -> None:
    """pan[i][j*v : (j+1)*v] = sum over stages s of cbk[s][group][code of row rb*R + i, column j] for the R rows of
    row tile rb: the tile's weights, float32, row-major (its codes are R adjacent codes per column)."""
    b, v, K, R, JB, S = g.b, spec.vec_len, spec.K, spec.R, spec.JB, spec.stages
    n_vec, G, rpg, cbk = a.n(lk.A_NVEC), a.n(lk.A_GROUPS), a.n(lk.A_RPG), a.p(lk.A_CBT)
    cvt, rvt = ir.VectorType(lc.F32, v), ir.VectorType(spec.ctype, R)
    grps = [g.min(b.sdiv(b.add(b.mul(rb, g.i64(R)), g.i64(i)), rpg), b.sub(G, g.i64(1))) for i in range(R)]
    rows = [b.gep(pan, [b.mul(g.i64(i), xs)], source_etype=lc.F32) for i in range(R)]
    for s in range(S):
        cbs = [b.gep(cbk, [b.mul(b.add(b.mul(g.i64(s), G), grp), g.i64(K * v))], source_etype=lc.F32) for grp in grps]
        with g.loop(0, n_vec, step=JB, name="pj") as j0:
            jl = g.min(g.i64(JB), b.sub(n_vec, j0))
            base = lk._code_base(g, a, spec, g.i64(s), j0, jl, rb)
            with g.loop(0, jl, name="pjj") as jj:
                codes = b.load(b.gep(base, [b.mul(jj, g.i64(R))], source_etype=spec.ctype), typ=rvt, align=1)
                col = b.mul(b.add(j0, jj), g.i64(v))
                for i in range(R):
                    c = b.zext(b.extract_element(codes, ir.Constant(lc.I32, i)), lc.I64)
                    cw = b.load(b.gep(cbs[i], [b.mul(c, g.i64(v))], source_etype=lc.F32), typ=cvt, align=4)
                    dst = b.gep(rows[i], [col], source_etype=lc.F32)
                    b.store(b.fadd(b.load(dst, typ=cvt, align=4), cw) if s else cw, dst, align=4)


def build_module(spec: lk.KernelSpec, P: int, TT: int, triple: str | None = None, panel: bool = False,
                 regs: int | None = None):
    """`regs`: the target's vector registers (default: 32 for aarch64 and AVX-512 hosts, see `vector_regs`)."""
    regs = vector_regs(triple) if regs is None else regs
    mod = lc.new_module(f"codebook_few_{spec.vec_len}_{spec.K}_{P}_{TT}{'_panel' if panel else ''}_{regs}", triple)
    lc.add_parallel_for(mod, _gen_few(mod, spec, P, TT, panel, regs))
    return mod


def vector_regs(triple: str | None = None) -> int:
    """Vector registers of `triple` (None: this host): 32 on aarch64 and x86 with AVX-512, else 16."""
    arm = ("aarch64", "arm64")
    if triple is not None:
        return 32 if triple.startswith(arm) else 16
    return 32 if lc.host_vector_bits() == 512 or lc.llvm.get_process_triple().startswith(arm) else 16


@functools.cache
def compiled(spec: lk.KernelSpec, P: int, TT: int, panel: bool = False, regs: int | None = None):
    """JIT the kernel for (spec, P, TT, panel) on this host (once per process; a decoder needs a few)."""
    return lk._PAR_T(lc.jit(build_module(spec, P, TT, panel=panel, regs=regs), ["few_work_par"])["few_work_par"])


def max_rows(n_threads: int) -> int:
    """The most inputs "auto" routes here, on any thread count: MAX_ROWS. This kernel splits rows without repeating
    work, while the LUT GEMM's batch tiles of 8 leave threads idle or build LUTs twice; past MAX_ROWS the panel
    GEMM (this kernel with each row tile decoded once, `gemm(panel=True)`) is ahead (measured on 2 AVX2 cores,
    576x576 and 576x1536, 1 and 2 threads, interleaved: at 12 inputs this kernel 1.04-1.3x the panel GEMM, at 16 the
    panel GEMM 1.13-1.2x this kernel, at 24 1.2-1.4x)."""
    return MAX_ROWS


def tiles(rows: int) -> tuple[int, int]:
    """(n_tiles, TT): `rows` inputs as n_tiles equal tiles of TT <= TT_MAX (the last padded with zero rows)."""
    n = max(1, math.ceil(rows / TT_MAX))
    return n, math.ceil(rows / n)


def _cbk(p: lk.Packed) -> torch.Tensor:
    t = p.__dict__.get("_cbk")
    if t is None:
        t = p.__dict__["_cbk"] = p.cbt.permute(0, 1, 3, 2).contiguous()  # [S, G, K, v]
    return t


def pack_inputs(p: lk.Packed, x2: torch.Tensor, TT: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x2 [B, in] -> (permuted x [B, in], the kernel's x [B, n_vec * v]: the quantized columns, padded with zero
    columns to whole code vectors -- x2 itself when it already is that -- and n_tiles, the tiles of TT inputs; the
    kernel reads a last, partial tile's missing inputs as its last input and stores only the inputs there are)."""
    B = x2.shape[0]
    n_tiles = -(-B // TT)
    xp = x2.index_select(1, p.perm) if p.perm is not None else x2
    xq = xp[:, p.n_out:] if p.n_out else xp
    cols = p.n_vec * p.spec.vec_len
    if xq.shape[1] != cols:
        xq = torch.nn.functional.pad(xq, (0, cols - xq.shape[1]))
    return xp, xq.contiguous(), n_tiles


def panel_stride(p: lk.Packed) -> int:
    """Scratch bytes per thread of the panel GEMM: one decoded row tile, [R][n_vec * v] float32, 64-byte aligned."""
    n = 4 * p.spec.R * p.n_vec * p.spec.vec_len + 64
    return n + (-n % 64)


def gemm(p: lk.Packed, x2: torch.Tensor, n_threads: int | None = None, panel: bool = False,
         regs: int | None = None) -> torch.Tensor:
    """Inputs x2 [B, in] (float32, contiguous) -> y [B, out]. panel: decode each row tile once into a float32 tile
    that tiles of PANEL_TT inputs share (prefill mode "panel"), instead of decoding in registers per input tile.
    regs: the vector registers the kernel's row unroll assumes (default: this host's, `vector_regs`)."""
    B = x2.shape[0]
    if B == 0:
        return x2.new_zeros(0, p.out_f)
    TT = PANEL_TT if panel else tiles(B)[1]
    xp, xq, n_tiles = pack_inputs(p, x2, TT)
    y = torch.empty(B, p.out_f, dtype=torch.float32)
    cbk = _cbk(p)
    a = p.argv()
    a[lk.A_X], a[lk.A_CBT], a[lk.A_Y], a[lk.A_NBT] = xq.data_ptr(), cbk.data_ptr(), y.data_ptr(), n_tiles
    a[lk.A_ROWS] = B
    if p.n_out:  # the outlier columns come first (torch), then scale and bias: `finish`
        a[lk.A_SCALE] = a[lk.A_BIAS] = 0
    P = codes_per_vector(p.spec, p.n_vec, lc.host_vector_bits() // 32)
    nt = lk._threads(p, n_threads, B)
    if panel:
        stride = panel_stride(p)
        a[lk.A_SCR], a[lk.A_SSTRIDE] = lc.scratch(stride * nt).data_ptr(), stride
    compiled(p.spec, P, TT, panel, regs)(a, p.n_rb, nt)
    return lk.finish(p, y, xp) if p.n_out else y
