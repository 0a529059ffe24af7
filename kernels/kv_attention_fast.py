"""llvmlite-generated CPU kernel for `edgetk::kv_attention` (contract and reference: kernels/kv_attention.py).

Fused dequantization: no dense fp cache is built. One work item = one (batch, KV head, context chunk); items are
spread over the threads (`llvm_common.add_parallel_for`). There is one chunk per head unless the heads do not
spread evenly over the threads (`chunks`: 3 KV heads on 2 threads -> 2 chunks each); then each item leaves a
partial (max, sum, unnormalised output) per query and the caller's thread combines them (as flash-decoding does).
Per item, for the rep*T queries that read this KV head, the slots are taken V at a time (V = the host's float
lanes: 8 on AVX2, 16 on AVX-512, 4 on NEON; fewer for small heads):

1. scores: each slot's key is decoded -- on AVX2 (x86, <= 32 levels) 8 codes at a time: the 8-byte window holding
   them is one broadcast load, a constant byte shuffle gives each code a dword with its two bytes, a per-lane
   shift (vpsrlvd) brings it to the bottom, and vpermps looks it up as is (it reads the index's low 3 bits; bits 3
   and 4 pick one of up to four 8-level tables via blendvps); otherwise the D codes are one `<P x i8>` load split
   into codes with shifts and shuffles and looked up with vpermps / vpermi2ps (AVX-512) or `llvm.masked.gather`
   -- then scaled and shifted by the per-channel statistics of its key block (converted from fp16 once per block),
   rotated (RoPE, row p; rotate_half is a constant shuffle) and stored to a V x D buffer; slots of the fp region
   are widened from fp16. Then per query the V dot products are summed together (`_K.sums`: V - 1 vector adds
   after shuffles, vhaddps on x86) into one vector of V scores, masked, and stored.
2. softmax per query, vectorised, with an inlined exp (Cody-Waite range reduction + degree-7 polynomial).
3. values: the block's V slots are dequantized (the same decoding, per-token group statistics) into the buffer;
   then per query its output, held in registers across the block, accumulates the V values times their weights.

The three passes run per QT query positions (a long prefill: its rows of scores stay in L2; the blocks are decoded
again for each). A block a query sees none of (causal prefill: about half) costs no dot products, and one whose
weights are all 0 no value FMAs.

Dense-and-sparse entries (outliers, attention sinks) replace dequantized elements as each slot is decoded: the
entries of one (k|v, batch, head) are sorted by flat index (as `QuantKVCache` writes them), so one cursor per
work item walks them alongside the slots; a slot with none (nearly all) costs one compare, its vector staying in
registers.

Compile-time: head_dim D, key and value code widths, value_group, V; everything else is runtime. Not handled here
(the reference serves): sparse entries not sorted, the GEAR low-rank term, non-float32 queries, D not even,
D * bits not a multiple of 8.
"""
from __future__ import annotations

import array
import ctypes
import functools
import math
from dataclasses import dataclass

import torch

from . import llvm_common as lc
from . import table
from .kv_attention import kv_attention_reference

ir = lc.ir
(A_Q, A_KC, A_KM, A_VC, A_VM, A_LEV, A_FP, A_COS, A_SIN, A_MASK, A_OUT, A_SCR, A_SSTRIDE, A_H, A_HQ, A_T, A_S, A_C,
 A_NBK, A_KG, A_NQ, A_NFP, A_MSTRIDE, A_NPAD, A_B, A_OIDX, A_OVAL, A_NOUT, A_NCH, A_PART) = range(30)
N_ARGS = 30
W = 16  # softmax vector width
QT = 16  # query positions per pass over the context (a long prefill: 3 x 16 rows of 2K scores stay in L2)
F16 = ir.HalfType()


@dataclass(frozen=True)
class KVSpec:
    D: int
    kbits: int
    vbits: int
    value_group: int
    permvar: bool = False  # levels looked up with vpermps / vpermi2ps (x86 AVX-512, <= 32 levels, D % 16 == 0)
    permps: bool = False  # else with 8-lane vpermps + selects (x86 AVX2, <= 32 levels, D % 8 == 0)
    V: int = 4  # slots per block = lanes of the dot products' vectors (the host's float lanes, dividing D)

    def P(self, bits: int) -> int:
        return self.D * bits // 8

    @property
    def LS(self) -> int:
        """Row stride of the (padded) levels table handed to the kernel."""
        return max(16, 1 << max(self.kbits, self.vbits))


@functools.cache
def _permvar_ok(D: int, bits: int) -> bool:
    lc._init()
    f = lc.llvm.get_host_cpu_features()
    chunks = D // 16
    return (bits <= 5 and D % 16 == 0 and chunks & (chunks - 1) == 0 and bool(f.get("avx512f"))
            and lc.llvm.get_process_triple().startswith("x86"))


@functools.cache
def _permps_ok(D: int, bits: int) -> bool:
    lc._init()
    chunks = D // 8  # concatenated pairwise: a power of two
    return (bits <= 5 and D % 8 == 0 and chunks & (chunks - 1) == 0
            and bool(lc.llvm.get_host_cpu_features().get("avx2"))
            and lc.llvm.get_process_triple().startswith("x86"))


def _vt(n, t=lc.F32):
    return ir.VectorType(t, n)


def _const_vec(vals, t=lc.F32):
    return ir.Constant(_vt(len(vals), t), list(vals))


class _K:
    """Emission helpers bound to one function."""

    def __init__(self, g: lc.Gen, spec: KVSpec, args):
        self.g, self.b, self.s, self.args = g, g.b, spec, args

    def p(self, i):
        return self.g.arg(self.args, i)

    def n(self, i):
        return self.g.arg(self.args, i, lc.I64)

    def shuffle(self, a, c, mask):
        return self.b.shuffle_vector(a, c, _const_vec(mask, lc.I32))

    def concat(self, vecs):
        """One vector of equal-length vectors laid end to end (pairwise; a power-of-two count)."""
        while len(vecs) > 1:
            n = vecs[0].type.count
            vecs = [self.shuffle(vecs[i], vecs[i + 1], range(2 * n)) for i in range(0, len(vecs), 2)]
        return vecs[0]

    def codes(self, ptr, bits: int):
        """<P x i8> at ptr -> <D x i32> codes (little-endian bit stream of `bits`-wide codes)."""
        b, s = self.b, self.s
        P = s.P(bits)
        raw = b.load(ptr, typ=_vt(P, lc.I8), align=1)
        if bits == 8:
            return b.zext(raw, _vt(P, lc.I32))
        if bits not in (2, 4):  # code d sits in bytes j, j+1 (j = d*bits // 8) at shift d*bits % 8
            idx = []
            for d in range(s.D):
                j = d * bits // 8
                idx += [j, j + 1 if j + 1 < P else P]  # index P = a zero byte of the second operand
            pairs = self.shuffle(raw, ir.Constant(_vt(P, lc.I8), [0] * P), idx)
            w = b.bitcast(pairs, _vt(s.D, lc.I16))  # little-endian: lane d = byte j | byte j+1 << 8
            w = b.lshr(w, ir.Constant(_vt(s.D, lc.I16), [d * bits % 8 for d in range(s.D)]))
            w = b.and_(w, ir.Constant(_vt(s.D, lc.I16), [(1 << bits) - 1] * s.D))
            return b.zext(w, _vt(s.D, lc.I32))
        per = 8 // bits
        m = ir.Constant(_vt(P, lc.I8), [(1 << bits) - 1] * P)
        parts = [b.and_(b.lshr(raw, ir.Constant(_vt(P, lc.I8), [k * bits] * P)), m) for k in range(per)]
        cat = self.concat(parts)  # parts[k] occupies [k*P, (k+1)*P)
        order = [k * P + i for i in range(P) for k in range(per)]  # code d = i*per + k
        return b.zext(self.shuffle(cat, cat, order), _vt(s.D, lc.I32))

    def lookup(self, table, codes, bits: int):
        """<D x float> = table[codes]: vpermps on 16-code chunks (AVX-512) or 8-code chunks (AVX2, one
        vpermps per 8 levels, picked by the code's high bits) where allowed, else a gather."""
        if not self.s.permvar:
            return self._permps(table, codes, bits) if self.s.permps else self.g.gather(table, codes, self.s.D)
        b, D, m = self.b, self.s.D, self.g.fn.module
        v16, i16 = _vt(16), _vt(16, lc.I32)
        tabs = [b.load(b.gep(table, [self.g.i64(16 * t)], source_etype=lc.F32), typ=v16, align=4)
                for t in range(1 if bits <= 4 else 2)]
        if len(tabs) == 1:  # 16 levels: vpermps
            name, ty = "llvm.x86.avx512.permvar.sf.512", ir.FunctionType(v16, [v16, i16])
            call = lambda c: b.call(fn, [tabs[0], c])  # noqa: E731
        else:  # 32 levels: vpermi2ps over two tables (code bit 4 picks the table)
            name, ty = "llvm.x86.avx512.vpermi2var.ps.512", ir.FunctionType(v16, [v16, i16, v16])
            call = lambda c: b.call(fn, [tabs[0], c, tabs[1]])  # noqa: E731
        fn = m.globals.get(name) or ir.Function(m, ty, name)
        chunks = [call(self.shuffle(codes, codes, range(16 * i, 16 * i + 16))) for i in range(D // 16)]
        return self.concat(chunks)

    def _permps(self, table, codes, bits: int):
        b, D = self.b, self.s.D
        v8, c8 = _vt(8), _vt(8, lc.I32)
        m = self.g.fn.module
        fn = m.globals.get("llvm.x86.avx2.permps") or ir.Function(
            m, ir.FunctionType(v8, [v8, c8]), "llvm.x86.avx2.permps")
        tabs = [b.load(b.gep(table, [self.g.i64(8 * t)], source_etype=lc.F32), typ=v8, align=4)
                for t in range(max(1, (1 << bits) // 8))]
        chunks = []
        for i in range(D // 8):
            c = self.shuffle(codes, codes, range(8 * i, 8 * i + 8))
            r = b.call(fn, [tabs[0], c])
            if len(tabs) > 1:
                hi = b.lshr(c, _const_vec([3] * 8, lc.I32))
                for t in range(1, len(tabs)):
                    sel = b.icmp_unsigned("==", hi, _const_vec([t] * 8, lc.I32))
                    r = b.select(sel, b.call(fn, [tabs[t], c]), r)
            chunks.append(r)
        return self.concat(chunks)

    def sums(self, parts):
        """V vectors of V floats -> one vector whose lane j is the sum of parts[j]'s lanes. Pairs are added
        after an evens / odds shuffle, first of elements within 128-bit chunks (x86: vhaddps), then of whole
        chunks: V - 1 adds for V sums instead of V horizontal reductions."""
        V = len(parts)
        c = min(4, V)

        def level(a, c_, unit):  # pairs: evens + odds of `unit`-wide pieces within chunks of c_ pieces
            out = []
            for x, y in zip(a[::2], a[1::2]):
                ev, od = [], []
                for ch in range(V // (c_ * unit)):
                    for src in (0, V):
                        for e in range(0, c_, 2):
                            base = src + (ch * c_ + e) * unit
                            ev += range(base, base + unit)
                            od += range(base + unit, base + 2 * unit)
                out.append(self.b.fadd(self.shuffle(x, y, ev), self.shuffle(x, y, od)))
            return out

        for _ in range(c.bit_length() - 1):
            parts = level(parts, c, 1)
        while len(parts) > 1:
            parts = level(parts, V // c, c)
        return parts[0]

    def mask_block(self, t, pb, last):
        """<V x i1>: query row t sees slots pb .. pb+V-1 (a slot past `last` reads slot `last`'s byte)."""
        b, g, V = self.b, self.g, self.s.V
        row = b.gep(self.p(A_MASK), [b.mul(t, self.n(A_MSTRIDE))], source_etype=lc.I8)
        zero = ir.Constant(_vt(V, lc.I8), [0] * V)
        var = g.var(_vt(V, lc.I8), name="visb")
        with b.if_else(b.icmp_signed("<=", b.add(pb, g.i64(V)), b.add(last, g.i64(1)))) as (full, tail):
            with full:
                b.store(b.load(b.gep(row, [pb], source_etype=lc.I8), typ=_vt(V, lc.I8), align=1), var)
            with tail:
                v = zero
                for j in range(V):
                    v = b.insert_element(v, g.load(lc.I8, row, g.min(b.add(pb, g.i64(j)), last)),
                                         ir.Constant(lc.I32, j))
                b.store(v, var)
        return b.icmp_unsigned("!=", b.load(var, typ=_vt(V, lc.I8)), zero)

    def levels(self, ptr, table, bits: int):
        """<D x float> = table[code] for the D `bits`-wide codes at ptr (`codes` + `lookup`; on AVX2 with 8+ bytes
        a row, `_decode8`)."""
        if self.s.permps and not self.s.permvar and self.s.P(bits) >= 8:
            return self._decode8(ptr, table, bits)
        return self.lookup(table, self.codes(ptr, bits), bits)

    def _decode8(self, ptr, table, bits: int):
        """AVX2, 8 codes at a time with no clean-up: the 8-byte window holding them (one broadcast load) is shuffled
        into one dword per code (its two bytes), shifted right by the code's bit offset (vpsrlvd), and handed to
        vpermps as is -- vpermps reads the index's low 3 bits, so the bits above the code do not matter; a code's
        bits 3 and 4 pick the 8-level table (shifted into the sign bit: blendvps). Codes of 2 bits see a table
        repeating their 4 levels (bit 2 is the next code's)."""
        b, g, D, P = self.b, self.g, self.s.D, self.s.P(bits)
        v8, c8 = _vt(8), _vt(8, lc.I32)
        m = g.fn.module
        fn = m.globals.get("llvm.x86.avx2.permps") or ir.Function(
            m, ir.FunctionType(v8, [v8, c8]), "llvm.x86.avx2.permps")
        tabs = [b.load(b.gep(table, [g.i64(8 * t)], source_etype=lc.F32), typ=v8, align=4)
                for t in range(max(1, (1 << bits) // 8))]
        if bits < 3:
            tabs[0] = self.shuffle(tabs[0], tabs[0], [i % (1 << bits) for i in range(8)])
        zero8 = ir.Constant(_vt(8, lc.I8), [0] * 8)
        blend = m.globals.get("llvm.x86.avx.blendv.ps.256") or ir.Function(
            m, ir.FunctionType(v8, [v8, v8, v8]), "llvm.x86.avx.blendv.ps.256")
        perm = lambda t, c: b.call(fn, [tabs[t], c])  # noqa: E731

        def pick(c, k, if0, if1):  # bit k of each code: if1, else if0 (the bit shifted into the sign: vblendvps)
            return b.call(blend, [if0, if1, b.bitcast(b.shl(c, _const_vec([31 - k] * 8, lc.I32)), v8)])
        out = []
        for grp in range(D // 8):
            start = min(grp * bits, P - 8)  # the 8 codes' bits lie in bytes [grp*bits, (grp+1)*bits)
            win = b.load(b.gep(ptr, [g.i64(start)], source_etype=lc.I8), typ=_vt(8, lc.I8), align=1)
            idx, sh = [], []
            for j in range(8):
                byte, off = divmod((grp * 8 + j) * bits, 8)
                byte -= start
                idx += [byte, byte + 1 if byte + 1 < 8 else 8, 8, 8]  # index 8: a zero byte
                sh.append(off)
            c = b.lshr(b.bitcast(self.shuffle(win, zero8, idx), c8), _const_vec(sh, lc.I32))
            r = perm(0, c)
            if len(tabs) >= 2:
                r = pick(c, 3, r, perm(1, c))
            if len(tabs) == 4:
                r = pick(c, 4, r, pick(c, 3, perm(2, c), perm(3, c)))
            out.append(r)
        return self.concat(out)

    def sparse(self, vec, idx, val, cursor, p):
        """Replace elements of the slot-p vector at `vec` (an alloca) by the sparse entries idx/val
        (int32 flat index p*D + d / fp16) the cursor points at, while they belong to slot p."""
        b, g, D = self.b, self.g, self.s.D

        def put(j, e):
            x = b.fpext(g.load(F16, val, j), lc.F32)
            g.store(lc.F32, x, b.bitcast(vec, lc.F32.as_pointer()), b.sub(e, b.mul(p, g.i64(D))))

        self._walk(idx, cursor, b.mul(b.add(p, g.i64(1)), g.i64(D)), put)

    def patched(self, vec, slot, idx, val, cursor, p):
        """`vec` (slot p's D elements) with the sparse entries at the cursor that belong to slot p replaced.
        The common case -- none -- is one compare and keeps the vector in registers; otherwise it goes through
        the alloca `slot`."""
        b, g = self.b, self.g
        n_out = self.n(A_NOUT)
        j = b.load(cursor, typ=lc.I64)
        e = b.sext(g.load(lc.I32, idx, g.min(j, g.max(b.sub(n_out, g.i64(1)), g.i64(0)))), lc.I64)
        hit = b.and_(b.icmp_signed("<", j, n_out), b.and_(
            b.icmp_signed(">=", e, g.i64(0)), b.icmp_signed("<", e, b.mul(b.add(p, g.i64(1)), g.i64(self.s.D)))))
        pre = b.block
        with b.if_then(hit, likely=False):
            b.store(vec, slot)
            self.sparse(slot, idx, val, cursor, p)
            fixed, fixed_in = b.load(slot, typ=vec.type), b.block
        out = b.phi(vec.type)
        out.add_incoming(vec, pre)
        out.add_incoming(fixed, fixed_in)
        return out

    def skip_sparse(self, idx, cursor, lo):
        """Advance the cursor past the used entries with flat index < lo (the slots before a chunk)."""
        self._walk(idx, cursor, lo)

    def _walk(self, idx, cursor, hi, on_entry=None):
        """While the cursor's entry is used (>= 0) and below flat index hi: on_entry(j, index), cursor += 1."""
        b, g = self.b, self.g
        n_out = self.n(A_NOUT)
        c1, c2 = b.append_basic_block("sp.more"), b.append_basic_block("sp.here")
        body, end = b.append_basic_block("sp.body"), b.append_basic_block("sp.end")
        b.branch(c1)
        b.position_at_end(c1)
        j = b.load(cursor, typ=lc.I64)
        b.cbranch(b.icmp_signed("<", j, n_out), c2, end)
        b.position_at_end(c2)
        e = b.sext(g.load(lc.I32, idx, j), lc.I64)
        b.cbranch(b.and_(b.icmp_signed(">=", e, g.i64(0)), b.icmp_signed("<", e, hi)), body, end)
        b.position_at_end(body)
        if on_entry is not None:
            on_entry(j, e)
        b.store(b.add(j, g.i64(1)), cursor)
        b.branch(c1)
        b.position_at_end(end)

    def by_region(self, p, n_q, quantized, fp_base):
        """Slot p's <D x float>: quantized() (emitted where p < n_q), else row p - n_q of the fp region at fp_base
        (fp16, widened)."""
        b, D = self.b, self.s.D
        with b.if_else(b.icmp_signed("<", p, n_q)) as (then, other):
            with then:
                vq, vq_in = quantized(), b.block
            with other:
                vf = self.half_vec(b.gep(fp_base, [b.mul(b.sub(p, n_q), self.g.i64(D))], source_etype=F16), D)
                vf_in = b.block
        v = b.phi(_vt(D))
        v.add_incoming(vq, vq_in)
        v.add_incoming(vf, vf_in)
        return v

    def half_vec(self, ptr, n):
        return self.b.fpext(self.b.load(ptr, typ=_vt(n, F16), align=2), _vt(n, lc.F32))

    def reduce_add(self, v):
        return self.g.reduce_add(v)

    def exp(self, x):
        """exp on <W x float>, relative error ~1e-7 on [-87, 88]; inputs below -87 give ~0."""
        b = self.b
        c = lambda v: _const_vec([v] * W)  # noqa: E731
        x = b.select(b.fcmp_ordered("<", x, c(-87.0)), c(-87.0), x)
        y = b.fmul(x, c(1.4426950408889634))
        m = self.g.fn.module
        name = f"llvm.rint.v{W}f32"
        rint = m.globals.get(name) or ir.Function(m, ir.FunctionType(_vt(W), [_vt(W)]), name)
        n = b.call(rint, [y])
        r = self.g.fma(n, c(-0.693145751953125), x)
        r = self.g.fma(n, c(-1.428606765330187e-06), r)
        p = c(1.0 / 5040)
        for k in (720, 120, 24, 6, 2, 1, 1):
            p = self.g.fma(p, r, c(1.0 / k))
        e = b.shl(b.add(b.fptosi(n, _vt(W, lc.I32)), _const_vec([127] * W, lc.I32)), _const_vec([23] * W, lc.I32))
        return b.fmul(p, b.bitcast(e, _vt(W)))


def _gen(mod, spec: KVSpec):
    fn = ir.Function(mod, lc.WORK_TYPE, "kv_items")
    g = lc.Gen(fn)
    args, tid, it0, it1 = fn.args
    k = _K(g, spec, args)
    b = g.b
    with g.loop(it0, it1, name="item") as item:
        _emit_item(k, tid, item)
    b.ret_void()
    return fn


def _gen_top(mod, spec: KVSpec, par):
    """kv_work_par(args, n_items, n_threads): the B*H*NCH items on the threads, then (NCH > 1) every query's
    output from its chunks' partials (max m_c, sum l_c, unnormalised acc_c): sum_c e^(m_c-M) acc_c / sum_c
    e^(m_c-M) l_c with M = max_c m_c."""
    fn = ir.Function(mod, ir.FunctionType(lc.VOID, [lc.PTR, lc.I64, lc.I64]), "kv_work_par")
    g = lc.Gen(fn)
    b = g.b
    args, n_items, nt = fn.args
    k = _K(g, spec, args)
    D, i64 = spec.D, g.i64
    b.call(par, [args, n_items, nt])
    nch = k.n(A_NCH)
    vd = _vt(D)
    with b.if_then(b.icmp_signed(">", nch, i64(1))):
        nq = b.mul(b.sdiv(k.n(A_HQ), k.n(A_H)), k.n(A_T))
        part, out = k.p(A_PART), k.p(A_OUT)
        rec = D + 2
        mxv, num = g.var(lc.F32, name="cm"), g.var(vd, name="cacc")
        den = g.var(lc.F32, name="cden")
        with g.loop(0, b.mul(b.mul(k.n(A_B), k.n(A_H)), nq), name="cq") as r:  # r = bh * nq + qi
            bh, qi = b.sdiv(r, nq), b.srem(r, nq)
            rp = lambda c: b.gep(part, [b.mul(b.add(b.mul(b.add(b.mul(bh, nch), c), nq), qi), i64(rec))],  # noqa: E731
                                 source_etype=lc.F32)
            b.store(ir.Constant(lc.F32, -math.inf), mxv)
            with g.loop(0, nch, name="cm1") as c:
                m = g.load(lc.F32, rp(c), i64(D))
                b.store(g.fmax(m, b.load(mxv, typ=lc.F32)), mxv)
            M = b.load(mxv, typ=lc.F32)
            b.store(_const_vec([0.0] * D), num)
            b.store(ir.Constant(lc.F32, 0.0), den)
            with g.loop(0, nch, name="cm2") as c:
                m = g.load(lc.F32, rp(c), i64(D))
                e = b.select(b.fcmp_ordered(">", m, ir.Constant(lc.F32, -math.inf)),
                             k.exp(g.splat(b.fsub(m, M), W)), _const_vec([0.0] * W))
                w = b.extract_element(e, ir.Constant(lc.I32, 0))
                b.store(g.fma(g.splat(w, D), b.load(rp(c), typ=vd, align=4), b.load(num, typ=vd)), num)
                b.store(b.fadd(b.fmul(w, g.load(lc.F32, rp(c), i64(D + 1))), b.load(den, typ=lc.F32)), den)
            inv = b.fdiv(ir.Constant(lc.F32, 1.0), b.load(den, typ=lc.F32))
            b.store(b.fmul(b.load(num, typ=vd), g.splat(inv, D)), b.gep(out, [b.mul(r, i64(D))], source_etype=lc.F32),
                    align=4)
    b.ret_void()
    return fn


def _emit_item(k: _K, tid, item):
    """One (batch, KV head, context chunk) item; chunk ch of NCH covers slots [p0, p1), taken V slots at a time."""
    g, b, s = k.g, k.b, k.s
    D, V, i64 = s.D, s.V, g.i64
    H, Hq, T = k.n(A_H), k.n(A_HQ), k.n(A_T)
    n_q, n_fp, npad = k.n(A_NQ), k.n(A_NFP), k.n(A_NPAD)
    n_all = b.add(n_q, n_fp)
    nch = k.n(A_NCH)
    chunk_i, item = b.srem(item, nch), b.sdiv(item, nch)  # from here on `item` is the (batch, KV head) index
    clen = b.sdiv(b.add(n_all, b.sub(nch, i64(1))), nch)
    p0 = g.min(b.mul(chunk_i, clen), n_all)
    p1 = g.min(b.add(p0, clen), n_all)
    n = b.sub(p1, p0)  # slots of this chunk; scores[qi][p - p0]
    rep = b.sdiv(Hq, H)  # queries reading this KV head: qi = r * T + t, taken QT positions t at a time
    nr = b.mul(rep, g.min(T, i64(QT)))  # rows of the scratch: r * tn + (t - t0) for the positions [t0, t0 + tn)
    bb, h = b.sdiv(item, H), b.srem(item, H)
    scr = b.gep(k.p(A_SCR), [b.mul(tid, k.n(A_SSTRIDE))], source_etype=lc.I8)
    scores = scr  # [nr][npad]
    acc = b.gep(scores, [b.mul(nr, npad)], source_etype=lc.F32)  # [nr][D], then tot[nr], mxs[nr]
    buf = b.gep(acc, [b.mul(nr, i64(D + 2))], source_etype=lc.F32)  # [V][D]: a block's rotated keys / values
    kmeta = b.gep(buf, [i64(V * D)], source_etype=lc.F32)  # [2][D]: the current key block's scale, zero (f32)
    q0 = b.gep(k.p(A_Q), [b.mul(b.mul(b.add(b.mul(bb, Hq), b.mul(h, rep)), T), i64(D))], source_etype=lc.F32)
    vd = _vt(D)
    inv = _const_vec([1.0 / math.sqrt(D)] * V)
    S, P, PV = k.n(A_S), s.P(s.kbits), s.P(s.vbits)
    kc = b.gep(k.p(A_KC), [b.mul(b.mul(item, S), i64(P))], source_etype=lc.I8)
    vc = b.gep(k.p(A_VC), [b.mul(b.mul(item, S), i64(PV))], source_etype=lc.I8)
    lev = k.p(A_LEV)
    fp_k = b.gep(k.p(A_FP), [b.mul(b.mul(item, k.n(A_C)), i64(D))], source_etype=F16)
    fp_v = b.gep(fp_k, [b.mul(b.mul(b.mul(k.n(A_B), H), k.n(A_C)), i64(D))], source_etype=F16)
    half = D // 2
    signs = _const_vec([-1.0] * half + [1.0] * half)
    rot = list(range(half, D)) + list(range(half))
    kvar = g.var(vd, name="key")
    # sparse entries of this item: keys at row item of out_idx[0], values at row B*H + item
    n_out = k.n(A_NOUT)
    row_k, row_v = b.mul(item, n_out), b.mul(b.add(b.mul(k.n(A_B), H), item), n_out)
    oidx_k = b.gep(k.p(A_OIDX), [row_k], source_etype=lc.I32)
    oval_k = b.gep(k.p(A_OVAL), [row_k], source_etype=F16)
    oidx_v = b.gep(k.p(A_OIDX), [row_v], source_etype=lc.I32)
    oval_v = b.gep(k.p(A_OVAL), [row_v], source_etype=F16)
    cur_k, cur_v = g.var(lc.I64, g.i64(0), name="cur_k"), g.var(lc.I64, g.i64(0), name="cur_v")
    for cur, oidx in ((cur_k, oidx_k), (cur_v, oidx_v)):  # skip the entries of slots before the chunk
        k.skip_sparse(oidx, cur, b.mul(p0, i64(D)))
    cur_k0, cur_v0 = b.load(cur_k, typ=lc.I64), b.load(cur_v, typ=lc.I64)
    last = b.sub(p1, i64(1))
    # the key block whose statistics sit in kmeta ends before slot kb_next (-1: none loaded yet)
    kb_next = g.var(lc.I64, i64(-1), name="kb_next")
    nbk, kg = k.n(A_NBK), k.n(A_KG)

    def key_q(p):
        """Quantized slot p's pre-RoPE key, <D x float> (the statistics of its key block converted when it starts)."""
        with b.if_then(b.icmp_signed(">=", p, b.load(kb_next, typ=lc.I64)), likely=False):
            blk = g.min(b.sdiv(p, kg), b.sub(nbk, i64(1)))
            meta = b.gep(k.p(A_KM), [b.mul(b.add(b.mul(item, nbk), blk), i64(2 * D))], source_etype=F16)
            b.store(k.half_vec(meta, D), kmeta, align=4)
            b.store(k.half_vec(b.gep(meta, [i64(D)], source_etype=F16), D),
                    b.gep(kmeta, [i64(D)], source_etype=lc.F32), align=4)
            nxt = b.select(b.icmp_signed("==", blk, b.sub(nbk, i64(1))), i64(2 ** 62),
                           b.mul(b.add(blk, i64(1)), kg))
            b.store(nxt, kb_next)
        lv = k.levels(b.gep(kc, [b.mul(p, i64(P))], source_etype=lc.I8), lev, s.kbits)
        scale = b.load(kmeta, typ=vd, align=4)
        zero = b.load(b.gep(kmeta, [i64(D)], source_etype=lc.F32), typ=vd, align=4)
        return k.patched(g.fma(lv, scale, zero), kvar, oidx_k, oval_k, cur_k, p)

    with g.loop(0, T, step=QT, name="tq") as t0:  # per QT query positions: their scores fit L2 (a long prefill)
        tn = g.min(i64(QT), b.sub(T, t0))
        nrow = b.mul(rep, tn)
        b.store(cur_k0, cur_k)  # the slots restart: so do the sparse entries' cursors and the key block
        b.store(cur_v0, cur_v)
        b.store(i64(-1), kb_next)
        # 1. scores, V slots per block: the block's rotated keys into buf, then per query V dot products reduced
        #    together (`k.sums`) into one <V x float> of scores. Slots past p1 repeat slot p1 - 1 (softmax ignores
        #    them).
        with g.loop(p0, p1, step=V, name="pb") as pb:
            with g.loop(0, V, name="j") as j:
                p = g.min(b.add(pb, j), last)
                kh = k.by_region(p, n_q, lambda: key_q(p), fp_k)
                cosv = b.load(b.gep(k.p(A_COS), [b.mul(p, i64(D))], source_etype=lc.F32), typ=vd, align=4)
                sinv = b.load(b.gep(k.p(A_SIN), [b.mul(p, i64(D))], source_etype=lc.F32), typ=vd, align=4)
                kr = g.fma(b.fmul(k.shuffle(kh, kh, rot), signs), sinv, b.fmul(kh, cosv))
                b.store(kr, b.gep(buf, [b.mul(j, i64(D))], source_etype=lc.F32), align=4)
            ninf = _const_vec([-math.inf] * V)
            with g.loop(0, tn, name="t") as tl:
                t = b.add(t0, tl)
                vis = k.mask_block(t, pb, last)
                row = lambda r: b.gep(scores, [b.add(b.mul(b.add(b.mul(r, tn), tl), npad),  # noqa: E731
                                                     b.sub(pb, p0))], source_etype=lc.F32)
                seen = b.icmp_unsigned("!=", b.bitcast(vis, ir.IntType(V)), ir.Constant(ir.IntType(V), 0))
                with b.if_else(seen) as (some, none):
                    with some:
                        with g.loop(0, rep, name="r") as r:
                            qrow = b.gep(q0, [b.mul(b.add(b.mul(r, T), t), i64(D))], source_etype=lc.F32)
                            qv = [b.load(b.gep(qrow, [i64(c * V)], source_etype=lc.F32), typ=_vt(V), align=4)
                                  for c in range(D // V)]
                            parts = []
                            for jj in range(V):
                                kj = [b.load(b.gep(buf, [i64(jj * D + c * V)], source_etype=lc.F32), typ=_vt(V),
                                             align=4) for c in range(D // V)]
                                sacc = b.fmul(qv[0], kj[0])
                                for c in range(1, D // V):
                                    sacc = g.fma(qv[c], kj[c], sacc)
                                parts.append(sacc)
                            b.store(b.select(vis, b.fmul(k.sums(parts), inv), ninf), row(r), align=4)
                    with none:  # a block this query does not see at all (causal prefill: half of them): no dot products
                        with g.loop(0, rep, name="rm") as r:
                            b.store(ninf, row(r), align=4)
        _emit_softmax(k, scores, nrow, nr, n, npad, acc)
        # 3. values, V slots per block: the block's dequantized values into buf (zero past p1), then each query's
        #    output (in registers across the block) += its V softmax weights times them
        NG = D // s.value_group
        gmap = [d // s.value_group for d in range(D)]
        vm0 = b.gep(k.p(A_VM), [b.mul(b.mul(item, S), i64(2 * NG))], source_etype=F16)
        lev1 = b.gep(lev, [i64(s.LS)], source_etype=lc.F32)

        def value_q(p):
            """Quantized slot p's value, <D x float>."""
            meta = b.gep(vm0, [b.mul(p, i64(2 * NG))], source_etype=F16)
            sc_ = k.half_vec(meta, NG)
            zr_ = k.half_vec(b.gep(meta, [i64(NG)], source_etype=F16), NG)
            lv = k.levels(b.gep(vc, [b.mul(p, i64(PV))], source_etype=lc.I8), lev1, s.vbits)
            return k.patched(g.fma(lv, k.shuffle(sc_, sc_, gmap), k.shuffle(zr_, zr_, gmap)), kvar, oidx_v, oval_v,
                             cur_v, p)

        with g.loop(p0, p1, step=V, name="vb") as pb:
            with g.loop(0, V, name="vj") as j:
                p = g.min(b.add(pb, j), last)
                vv = k.by_region(p, n_q, lambda: value_q(p), fp_v)
                vv = b.select(b.icmp_signed("<", b.add(pb, j), p1), vv, _const_vec([0.0] * D))
                b.store(vv, b.gep(buf, [b.mul(j, i64(D))], source_etype=lc.F32), align=4)
            vals = [[b.gep(buf, [i64(jj * D + c * V)], source_etype=lc.F32) for c in range(D // V)] for jj in range(V)]
            with g.loop(0, nrow, name="qa") as qi:
                w = b.load(b.gep(scores, [b.add(b.mul(qi, npad), b.sub(pb, p0))], source_etype=lc.F32), typ=_vt(V),
                           align=4)
                nz = b.fcmp_unordered("!=", w, _const_vec([0.0] * V))
                # (all weights 0 -- masked -- nothing to add)
                with b.if_then(b.icmp_unsigned("!=", b.bitcast(nz, ir.IntType(V)), ir.Constant(ir.IntType(V), 0))):
                    arow = b.gep(acc, [b.mul(qi, i64(D))], source_etype=lc.F32)
                    aps = [b.gep(arow, [i64(c * V)], source_etype=lc.F32) for c in range(D // V)]
                    av = [b.load(ap, typ=_vt(V), align=4) for ap in aps]
                    for jj in range(V):
                        wj = g.splat(b.extract_element(w, ir.Constant(lc.I32, jj)), V)
                        av = [g.fma(wj, b.load(vals[jj][c], typ=_vt(V), align=4), av[c]) for c in range(D // V)]
                    for ap, a_ in zip(aps, av):
                        b.store(a_, ap, align=4)
        # output = acc / sum (the sums and maxima sit in tot[nr], mxs[nr] after acc); row r * tn + tl is query
        # r * T + t0 + tl
        out0 = b.gep(k.p(A_OUT), [b.mul(b.mul(b.add(b.mul(bb, Hq), b.mul(h, rep)), T), i64(D))], source_etype=lc.F32)
        tot = b.gep(acc, [b.mul(nr, i64(D))], source_etype=lc.F32)
        mxs = b.gep(tot, [nr], source_etype=lc.F32)
        rec = b.gep(k.p(A_PART), [b.mul(b.mul(b.add(b.mul(item, nch), chunk_i), b.mul(rep, T)), i64(D + 2))],
                    source_etype=lc.F32)  # (nch > 1) partial record per query: acc[D] (unnormalised), max, sum
        with g.loop(0, rep, name="qr") as r, g.loop(0, tn, name="qt") as tl:
            lr, qi = b.add(b.mul(r, tn), tl), b.add(b.mul(r, T), b.add(t0, tl))
            ap = b.gep(acc, [b.mul(lr, i64(D))], source_etype=lc.F32)
            with b.if_else(b.icmp_signed("==", nch, i64(1))) as (one, many):
                with one:
                    inv_sum = b.fdiv(ir.Constant(lc.F32, 1.0), g.load(lc.F32, tot, lr))
                    b.store(b.fmul(b.load(ap, typ=vd, align=4), g.splat(inv_sum, D)),
                            b.gep(out0, [b.mul(qi, i64(D))], source_etype=lc.F32), align=4)
                with many:
                    rp = b.gep(rec, [b.mul(qi, i64(D + 2))], source_etype=lc.F32)
                    b.store(b.load(ap, typ=vd, align=4), rp, align=4)
                    g.store(lc.F32, g.load(lc.F32, mxs, lr), rp, i64(D))
                    g.store(lc.F32, g.load(lc.F32, tot, lr), rp, i64(D + 1))


def _emit_softmax(k: _K, scores, nq, nr, n, npad, acc):
    """For the rows qi < nq (of nr): scores[qi][p] <- exp(scores - max) (p < n; 0 in the padding); tot[qi] = sum,
    mxs[qi] = max (-inf when no slot is visible); acc[qi][:] = 0."""
    g, b, D = k.g, k.b, k.s.D
    vw = _vt(W)
    tot = b.gep(acc, [b.mul(nr, g.i64(D))], source_etype=lc.F32)
    mxs = b.gep(tot, [nr], source_etype=lc.F32)
    mx, sm = g.var(vw, name="mx"), g.var(vw, name="sm")
    ninf = _const_vec([-math.inf] * W)
    lanes = _const_vec(list(range(W)), lc.I64)
    with g.loop(0, nq, name="sq") as qi:
        row = b.gep(scores, [b.mul(qi, npad)], source_etype=lc.F32)
        b.store(ninf, mx)
        with g.loop(0, npad, step=W, name="sm1") as p:
            valid = b.icmp_signed("<", b.add(g.splat(p, W), lanes), g.splat(n, W))
            x = b.select(valid, b.load(b.gep(row, [p], source_etype=lc.F32), typ=vw, align=4), ninf)
            b.store(g.fmax(x, b.load(mx, typ=vw)), mx)
        m1 = g.hmax(b.load(mx, typ=vw))
        g.store(lc.F32, m1, mxs, qi)
        mb = g.splat(m1, W)
        b.store(_const_vec([0.0] * W), sm)
        with g.loop(0, npad, step=W, name="sm2") as p:
            ptr = b.gep(row, [p], source_etype=lc.F32)
            valid = b.icmp_signed("<", b.add(g.splat(p, W), lanes), g.splat(n, W))
            x = b.select(valid, b.load(ptr, typ=vw, align=4), ninf)
            e = b.select(b.fcmp_ordered(">", x, ninf), k.exp(b.fsub(x, mb)), _const_vec([0.0] * W))
            b.store(e, ptr, align=4)
            b.store(b.fadd(b.load(sm, typ=vw), e), sm)
        g.store(lc.F32, k.reduce_add(b.load(sm, typ=vw)), tot, qi)
        b.store(_const_vec([0.0] * D), b.gep(acc, [b.mul(qi, g.i64(D))], source_etype=lc.F32), align=4)


def build_module(spec: KVSpec, triple: str | None = None):
    mod = lc.new_module(f"kv_attention_{spec.D}_{spec.kbits}_{spec.vbits}", triple)
    _gen_top(mod, spec, lc.add_parallel_for(mod, _gen(mod, spec)))
    return mod


_PAR_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


@functools.cache
def compiled(spec: KVSpec):
    return _PAR_T(lc.jit(build_module(spec), ["kv_work_par"])["kv_work_par"])


def supported(q, k_codes, v_meta, levels, out_idx, lr_u, mask, key_bits, value_bits, value_group) -> bool:
    D = q.shape[-1]
    return (all(2 <= b <= 8 and (D * b) % 8 == 0 for b in (key_bits, value_bits))
            and q.dtype == torch.float32 and _sparse_sorted(out_idx) and not lr_u.numel()
            and D % 2 == 0 and D % value_group == 0 and v_meta.shape[-1] * value_group == D
            and k_codes.dtype == torch.uint8 and levels.shape[-1] == 1 << max(key_bits, value_bits)
            and mask.dtype == torch.bool and q.device.type == "cpu")


def _until_written(t: torch.Tensor, attr: str, key, compute):
    """compute(), remembered on tensor t (attribute `attr`, with `key`) until t is next written (its version counter
    moves); an inference tensor (made under torch.inference_mode) keeps no version counter: computed every call."""
    try:
        version = t._version
    except RuntimeError:
        return compute()
    seen = getattr(t, attr, None)
    if seen is not None and seen[0] == (version, key):
        return seen[1]
    value = compute()
    setattr(t, attr, ((version, key), value))
    return value


def _sparse_sorted(out_idx) -> bool:
    """Every row of sparse entries: used entries (>= 0) first, strictly increasing; then unused (-1).

    Remembered per tensor until it is next written: the cache hands the kernel the same buffer every layer and
    token and writes it once a block (~130 us a check at kv4's capacity)."""
    if not out_idx.numel():
        return True
    return _until_written(out_idx, "_edgetk_rows_sorted", None, lambda: _rows_sorted(out_idx))


def _rows_sorted(out_idx) -> bool:
    idx = out_idx.reshape(-1, out_idx.shape[-1]).numpy()  # numpy: ~10x less per-op overhead on these small rows
    a, c = idx[:, :-1], idx[:, 1:]
    return bool(((c < 0) | ((c > a) & (a >= 0))).all())  # each used entry follows a smaller used one


def _shapes_ok(q, k_codes, k_meta, v_codes, v_meta, kv_fp, out_idx, out_val, cos, sin, mask, n_q, n_fp,
               key_bits, value_bits) -> bool:
    """Every index the kernel forms stays inside its tensor (else the reference raises or handles it)."""
    B, Hq, T, D = q.shape
    _, H, S, P = k_codes.shape
    n = n_q + n_fp
    return (H > 0 and Hq % H == 0 and P * 8 == D * key_bits
            and tuple(v_codes.shape) == (B, H, S, D * value_bits // 8)
            and tuple(k_meta.shape[:2]) == (B, H) and tuple(k_meta.shape[3:]) == (2, D) and k_meta.shape[2] >= 1
            and tuple(v_meta.shape[:4]) == (B, H, S, 2) and tuple(kv_fp.shape[:3]) == (2, B, H)
            and kv_fp.shape[3] >= n_fp and kv_fp.shape[4] == D and 0 <= n_q and 0 <= n_fp and n <= S
            and cos.shape[0] >= n and sin.shape[0] >= n and cos.shape[1] == D and sin.shape[1] == D
            and mask.shape[0] == T and mask.shape[1] >= n
            and (not out_idx.numel() or (tuple(out_idx.shape[:3]) == (2, B, H) and out_val.shape == out_idx.shape
                                         and out_idx.dtype == torch.int32)))


def kv_attention_llvm(q, k_codes, k_meta, v_codes, v_meta, levels, kv_fp, out_idx, out_val, lr_u, lr_v, cos,
                      sin, mask, n_q: int, n_fp: int, key_group: int, value_group: int, key_bits: int,
                      value_bits: int, n_threads: int | None = None):
    """Same signature and result as `kv_attention_reference`; cases it does not take go there."""
    args = (q, k_codes, k_meta, v_codes, v_meta, levels, kv_fp, out_idx, out_val, lr_u, lr_v, cos, sin, mask,
            n_q, n_fp, key_group, value_group, key_bits, value_bits)
    if not (_checked(q, k_codes, k_meta, v_codes, v_meta, levels, kv_fp, out_idx, out_val, lr_u, cos, sin, mask,
                     n_q, n_fp, key_bits, value_bits, value_group) and _sparse_sorted(out_idx)):
        return kv_attention_reference(*args)
    B, Hq, T, D = q.shape
    H, S = k_codes.shape[1], k_codes.shape[2]
    n = n_q + n_fp
    spec = _spec(D, key_bits, value_bits, value_group)
    # no-ops (~0.1 us each) for the cache's own buffers
    q, k_codes, v_codes, mask = q.contiguous(), k_codes.contiguous(), v_codes.contiguous(), mask.contiguous()
    k_meta = (k_meta if k_meta.dtype == torch.float16 else k_meta.half()).contiguous()
    v_meta = (v_meta if v_meta.dtype == torch.float16 else v_meta.half()).contiguous()
    kv_fp = (kv_fp if kv_fp.dtype == torch.float16 else kv_fp.half()).contiguous()
    cos = (cos if cos.dtype == torch.float32 else cos.float()).contiguous()
    sin = (sin if sin.dtype == torch.float32 else sin.float()).contiguous()
    levels = _padded_levels(levels, spec.LS)
    n_out = out_idx.shape[-1] if out_idx.numel() else 0
    if n_out:
        out_idx = out_idx.contiguous()
        out_val = (out_val if out_val.dtype == torch.float16 else out_val.half()).contiguous()
    else:  # never read (the cursor stops at n_out = 0)
        out_idx, out_val = _NO_IDX, _NO_VAL
    out = torch.empty(B, Hq, T, D, dtype=torch.float32)
    nq = (Hq // H) * T
    nr = (Hq // H) * min(T, QT)  # scratch rows (query positions are taken QT at a time)
    nt = max(1, torch.get_num_threads() if n_threads is None else n_threads)
    if n_threads is None and B * H * n * nq < 8000:  # starting threads costs more than they save
        nt = 1
    nch = chunks(B * H, nt, n)
    nt = min(nt, B * H * nch)
    clen = -(-n // nch)
    npad = max(W, -(-clen // W) * W)
    stride = 4 * (nr * npad + nr * D + 2 * nr + spec.V * D + 2 * D) + 64
    stride += -stride % 64
    scr = lc.scratch(stride * nt)
    part = torch.empty(B * H * nch * nq * (D + 2), dtype=torch.float32) if nch > 1 else _NO_PART
    a = [0] * N_ARGS
    for i, t in ((A_Q, q), (A_KC, k_codes), (A_KM, k_meta), (A_VC, v_codes), (A_VM, v_meta), (A_LEV, levels),
                 (A_FP, kv_fp), (A_COS, cos), (A_SIN, sin), (A_MASK, mask), (A_OUT, out), (A_SCR, scr),
                 (A_OIDX, out_idx), (A_OVAL, out_val), (A_PART, part)):
        a[i] = t.data_ptr()
    a[A_SSTRIDE], a[A_H], a[A_HQ], a[A_T], a[A_S], a[A_C] = stride, H, Hq, T, S, kv_fp.shape[3]
    a[A_NBK], a[A_KG], a[A_NQ], a[A_NFP], a[A_MSTRIDE], a[A_NPAD], a[A_B] = (
        k_meta.shape[2], key_group, n_q, n_fp, mask.shape[1], npad, B)
    a[A_NOUT], a[A_NCH] = n_out, nch
    block = array.array("q", a)  # (a ctypes array of 30 fields costs ~5 us to fill; this ~1 us)
    compiled(spec)(block.buffer_info()[0], B * H * nch, nt)
    return out


def _padded_levels(levels: torch.Tensor, ls: int) -> torch.Tensor:
    """levels as contiguous float32 rows of `ls` entries (the kernel loads 8 or 16 at a time): the tensor itself
    when it already is, else a padded copy kept on the tensor until it is next written."""
    if levels.shape[-1] == ls and levels.dtype == torch.float32:
        return levels.contiguous()
    return _until_written(levels, "_edgetk_padded_levels", ls, lambda: torch.nn.functional.pad(
        levels.float(), (0, ls - levels.shape[-1])).contiguous())


_NO_IDX = torch.full((1,), -1, dtype=torch.int32)
_NO_VAL = torch.zeros(1, dtype=torch.float16)
_NO_PART = torch.empty(1, dtype=torch.float32)


@functools.cache
def _spec(D: int, key_bits: int, value_bits: int, value_group: int) -> KVSpec:
    mb = max(key_bits, value_bits)
    return KVSpec(D, key_bits, value_bits, value_group, _permvar_ok(D, mb), _permps_ok(D, mb), block_slots(D))


def block_slots(D: int, vector_bits: int | None = None) -> int:
    """Slots per block (V): the host's float lanes, or the largest power of two dividing D if that is fewer."""
    v = (vector_bits or lc.host_vector_bits()) // 32
    while D % v:
        v //= 2
    return max(v, 2)


_CHECKED: dict = {}  # call signature -> whether the kernel takes it (a decode loop repeats a few signatures)


def _checked(q, k_codes, k_meta, v_codes, v_meta, levels, kv_fp, out_idx, out_val, lr_u, cos, sin, mask, n_q,
             n_fp, key_bits, value_bits, value_group) -> bool:
    """`supported` (but the data-dependent sorting of the sparse rows) and `_shapes_ok`, memoised on every
    shape, dtype and scalar they read."""
    key = (q.shape, q.dtype, q.is_cpu, k_codes.shape, k_codes.dtype, k_meta.shape, v_codes.shape,
           v_meta.shape, levels.shape, kv_fp.shape, out_idx.shape, out_idx.dtype, out_val.shape, lr_u.numel() > 0,
           cos.shape, sin.shape, mask.shape, mask.dtype, key_bits, value_bits, value_group)
    ok = _CHECKED.get(key)
    if ok is None:  # with no slots: every check that does not depend on the slot counts (which change every token)
        ok = (supported(q, k_codes, v_meta, levels, torch.empty(0, dtype=torch.int32), lr_u, mask, key_bits,
                        value_bits, value_group)
              and _shapes_ok(q, k_codes, k_meta, v_codes, v_meta, kv_fp, out_idx, out_val, cos, sin, mask, 0, 0,
                             key_bits, value_bits))
        if len(_CHECKED) > 4096:  # a long-running server with ever-new shapes: start over
            _CHECKED.clear()
        _CHECKED[key] = ok
    return (ok and 0 <= n_q and 0 <= n_fp <= kv_fp.shape[3]
            and n_q + n_fp <= min(k_codes.shape[2], cos.shape[0], sin.shape[0], mask.shape[1]))


MIN_CHUNK = 256  # context slots per chunk at least (a chunk's partial costs D + 2 floats per query to combine)


def chunks(n_heads: int, n_threads: int, n: int) -> int:
    """Context chunks per (batch, KV head): 1, unless the heads do not spread evenly over the threads (3 KV heads
    on 2 threads leave one thread a third idle); then enough chunks that every thread gets the same share, as long
    as each chunk keeps MIN_CHUNK slots."""
    if n_threads <= 1 or n_heads % n_threads == 0:
        return 1
    want = n_threads // math.gcd(n_heads, n_threads)
    return max(1, min(want, n // MIN_CHUNK))


def available() -> bool:
    try:
        lc.target_machine()
        return True
    except Exception:  # noqa: BLE001 - no usable LLVM target -> the reference serves
        return False


table.register("kv_attention", "cpu", "eager", "llvm", kv_attention_llvm, priority=10, available=available)
