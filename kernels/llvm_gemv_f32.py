"""fp32 GEMV for one input row on CPU, the weight's rows split over the threads (llvmlite).

`F.linear` with one row goes to the BLAS's sgemv, and the CPU build's MKL runs that on one thread: on the 2-core
AVX2 host (AMD EPYC Zen 3) smollm2-135m's 49152 x 576 head takes 12.1-12.7 ms at 1 and 2 threads alike (~9 GB/s
against the 20.6 GB/s two threads read), and the head is a third of a 2-bit model's decode step. This kernel
streams W once, contiguous ranges of row blocks on each thread (`llvm_common.add_parallel_for`: PyTorch's OpenMP
team where it is loaded), each block of `RB` rows against `VW`-wide slices of x with two accumulators a row
(host vector width: 8 floats on AVX2, 16 on AVX-512, 4 on NEON), then a scalar tail. Same result as
`F.linear` up to summation order (tests/kernels/test_kernels_few_rows.py).

Used by the eager LLM runtime for one-row steps (`few_rows_linear.few_rows_linears`) on weights of at least
`MIN_WEIGHTS` elements, where starting the threads pays.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import llvm_common as lc

ir = lc.ir
A_W, A_X, A_Y, A_B, A_N, A_K = range(6)
N_ARGS = 6
RB = 4  # rows a block
MIN_WEIGHTS = 1 << 16  # smaller weights: F.linear (the thread start costs more than the second thread saves)


def build_module(vw: int, triple: str | None = None):
    """`gemv_blocks_par(args, n_blocks, n_threads)`: y[r] = W[r] . x (+ b[r]) for r < n, blocks of RB rows;
    args = [W, x, y, b (0: none), n, k] (W row-major [n, k], float32)."""
    mod = lc.new_module(f"gemv_f32_{vw}", triple)
    fn = ir.Function(mod, lc.WORK_TYPE, "gemv_blocks")
    g = lc.Gen(fn)
    b = g.b
    args, _tid, b0, b1 = fn.args
    w, x, y, bias = (g.arg(args, i) for i in (A_W, A_X, A_Y, A_B))
    n, k = g.arg(args, A_N, lc.I64), g.arg(args, A_K, lc.I64)
    vt = ir.VectorType(lc.F32, vw)
    step = 2 * vw
    k2 = b.mul(b.sdiv(k, g.i64(step)), g.i64(step))  # columns in whole double vectors
    has_bias = b.icmp_unsigned("!=", b.ptrtoint(bias, lc.I64), g.i64(0))
    zero = ir.Constant(vt, [0.0] * vw)
    with g.loop(b0, b1, name="blk") as blk:
        r0 = b.mul(blk, g.i64(RB))
        last = b.sub(n, g.i64(1))
        rows = [g.min(b.add(r0, g.i64(i)), last) for i in range(RB)]  # a short last block repeats row n-1
        wrow = [b.gep(w, [b.mul(r, k)], source_etype=lc.F32) for r in rows]
        accs = [g.var(vt, zero, name=f"a{i}") for i in range(2 * RB)]
        with g.loop(0, k2, step=step, name="kk") as c:
            xs = [b.load(b.gep(x, [b.add(c, g.i64(h * vw))], source_etype=lc.F32), typ=vt, align=4)
                  for h in range(2)]
            for i in range(RB):
                for h in range(2):
                    wv = b.load(b.gep(wrow[i], [b.add(c, g.i64(h * vw))], source_etype=lc.F32), typ=vt, align=4)
                    a = accs[2 * i + h]
                    b.store(g.fma(wv, xs[h], b.load(a, typ=vt)), a)
        tails = [g.var(lc.F32, ir.Constant(lc.F32, 0.0), name=f"t{i}") for i in range(RB)]
        with g.loop(k2, k, name="kt") as c:
            xv = g.load(lc.F32, x, c)
            for i in range(RB):
                t = tails[i]
                b.store(g.fma(g.load(lc.F32, wrow[i], c), xv, b.load(t, typ=lc.F32)), t)
        for i in range(RB):
            s = b.fadd(b.load(accs[2 * i], typ=vt), b.load(accs[2 * i + 1], typ=vt))
            tot = b.fadd(g.reduce_add(s), b.load(tails[i], typ=lc.F32))
            with b.if_then(b.icmp_signed("<", b.add(r0, g.i64(i)), n)):
                bv = b.select(has_bias, g.load(lc.F32, bias, rows[i]), ir.Constant(lc.F32, 0.0))
                g.store(lc.F32, b.fadd(tot, bv), y, rows[i])
    b.ret_void()
    lc.add_parallel_for(mod, fn)
    return mod


_PAR_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


@functools.cache
def vector_width() -> int:
    return max(4, lc.host_vector_bits() // 32)


@functools.cache
def compiled(vw: int):
    return _PAR_T(lc.jit(build_module(vw), ["gemv_blocks_par"])["gemv_blocks_par"])


@functools.cache
def available() -> bool:
    try:
        compiled(vector_width())
        return True
    except Exception:  # noqa: BLE001 - no usable LLVM target: F.linear serves
        return False


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """One fp32 CPU row against a contiguous fp32 weight big enough to split."""
    return (x.dim() >= 1 and x.numel() == x.shape[-1] == weight.shape[-1] and weight.dim() == 2
            and weight.numel() >= MIN_WEIGHTS and x.dtype == weight.dtype == torch.float32
            and x.device.type == weight.device.type == "cpu" and weight.is_contiguous() and not weight.is_sparse
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()
                                  and bias.shape == weight.shape[:1])))


def gemv_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             n_threads: int | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row x [..., k] (all leading dimensions 1) -> [..., n]."""
    n, k = weight.shape
    xc = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    nt = max(1, torch.get_num_threads() if n_threads is None else n_threads)
    blocks = -(-n // RB)
    a = (ctypes.c_int64 * N_ARGS)(weight.data_ptr(), xc.data_ptr(), y.data_ptr(),
                                  0 if bias is None else bias.data_ptr(), n, k)
    compiled(vector_width())(a, blocks, min(nt, blocks))
    return y
