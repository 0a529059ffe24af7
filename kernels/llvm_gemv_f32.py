"""fp32 GEMV for one input row (and `gemm_rows` for a few) on CPU, the weight's rows split over the threads
(llvmlite).

`F.linear` with one row goes to the BLAS's sgemv, and the CPU build's MKL runs that on one thread: on the 2-core
AVX2 host (AMD EPYC Zen 3) smollm2-135m's 49152 x 576 head takes 12.1-12.7 ms at 1 and 2 threads alike (~9 GB/s
against the 20.6 GB/s two threads read), and the head is a third of a 2-bit model's decode step. This kernel
streams W once, contiguous ranges of row blocks on each thread (`llvm_common.add_parallel_for`: PyTorch's OpenMP
team where it is loaded), each block of `RB` rows against `VW`-wide slices of x with two accumulators a row
(host vector width: 8 floats on AVX2, 16 on AVX-512, 4 on NEON), then a scalar tail. Same result as
`F.linear` up to summation order (tests/kernels/test_kernels_few_rows.py).

`gemm_rows` (T = 2..16 inputs, T compiled in): per weight row and vector of VW columns, one weight load and T FMAs
against the T inputs (from L1), so W streams once for all of them (`few_rows_linear`: draft-tree steps).

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


def _open(mod, name: str):
    """A work function `name`(args, tid, b0, b1) of `mod` and its arguments: (fn, Gen, b0, b1, W, x, y, bias, n, k)."""
    fn = ir.Function(mod, lc.WORK_TYPE, name)
    g = lc.Gen(fn)
    args, _tid, b0, b1 = fn.args
    w, x, y, bias = (g.arg(args, i) for i in (A_W, A_X, A_Y, A_B))
    return fn, g, b0, b1, w, x, y, bias, g.arg(args, A_N, lc.I64), g.arg(args, A_K, lc.I64)


def build_module(vw: int, triple: str | None = None):
    """`gemv_blocks_par(args, n_blocks, n_threads)`: y[r] = W[r] . x (+ b[r]) for r < n, blocks of RB rows;
    args = [W, x, y, b (0: none), n, k] (W row-major [n, k], float32)."""
    mod = lc.new_module(f"gemv_f32_{vw}", triple)
    fn, g, b0, b1, w, x, y, bias, n, k = _open(mod, "gemv_blocks")
    b = g.b
    vt = ir.VectorType(lc.F32, vw)
    step = 2 * vw
    k2 = b.mul(b.sdiv(k, g.i64(step)), g.i64(step))  # columns in whole double vectors
    zero, zero1 = ir.Constant(vt, [0.0] * vw), ir.Constant(lc.F32, 0.0)
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
                g.store(lc.F32, b.fadd(tot, g.load_or(lc.F32, bias, rows[i], zero1)), y, rows[i])
    b.ret_void()
    lc.add_parallel_for(mod, fn)
    return mod


ROWS_RB = 1  # weight rows a block of the T-input kernel (blocks of 2-3 rows measured 1.0-1.5x slower, T = 3-6)


def build_rows_module(vw: int, T: int, triple: str | None = None, rb: int = ROWS_RB):
    """`gemm_rows_par(args, n_blocks, n_threads)`: y[t][r] = W[r] . x[t] (+ b[r]) for T inputs x [T, k] (row-major)
    and r < n, blocks of rb rows; args as `build_module` (y [T, n]). Each weight vector is loaded once and
    multiplied with all T inputs (from L1): T inputs stream W once, as one input does."""
    mod = lc.new_module(f"gemm_rows_f32_{vw}_{T}", triple)
    fn, g, b0, b1, w, x, y, bias, n, k = _open(mod, "gemm_rows")
    b = g.b
    vt = ir.VectorType(lc.F32, vw)
    k1 = b.mul(b.sdiv(k, g.i64(vw)), g.i64(vw))
    zero, zero1 = ir.Constant(vt, [0.0] * vw), ir.Constant(lc.F32, 0.0)
    xrow = [b.gep(x, [b.mul(g.i64(t), k)], source_etype=lc.F32) for t in range(T)]
    accs = [[g.var(vt, name=f"a{i}_{t}") for t in range(T)] for i in range(rb)]
    tails = [[g.var(lc.F32, name=f"t{i}_{t}") for t in range(T)] for i in range(rb)]
    with g.loop(b0, b1, name="blk") as blk:
        r0 = b.mul(blk, g.i64(rb))
        last = b.sub(n, g.i64(1))
        rows = [g.min(b.add(r0, g.i64(i)), last) for i in range(rb)]  # a short last block repeats row n-1
        wrow = [b.gep(w, [b.mul(r, k)], source_etype=lc.F32) for r in rows]
        for i in range(rb):
            for t in range(T):
                b.store(zero, accs[i][t])
                b.store(ir.Constant(lc.F32, 0.0), tails[i][t])
        with g.loop(0, k1, step=vw, name="kk") as c:
            wv = [b.load(b.gep(wrow[i], [c], source_etype=lc.F32), typ=vt, align=4) for i in range(rb)]
            for t in range(T):
                xv = b.load(b.gep(xrow[t], [c], source_etype=lc.F32), typ=vt, align=4)
                for i in range(rb):
                    b.store(g.fma(wv[i], xv, b.load(accs[i][t], typ=vt)), accs[i][t])
        with g.loop(k1, k, name="kt") as c:
            for i in range(rb):
                wf = g.load(lc.F32, wrow[i], c)
                for t in range(T):
                    b.store(g.fma(wf, g.load(lc.F32, xrow[t], c), b.load(tails[i][t], typ=lc.F32)), tails[i][t])
        for i in range(rb):
            with b.if_then(b.icmp_signed("<", b.add(r0, g.i64(i)), n)):
                bv = g.load_or(lc.F32, bias, rows[i], zero1)
                for t in range(T):
                    tot = b.fadd(g.reduce_add(b.load(accs[i][t], typ=vt)), b.load(tails[i][t], typ=lc.F32))
                    g.store(lc.F32, b.fadd(tot, bv), y, b.add(b.mul(g.i64(t), n), rows[i]))
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
def compiled_rows(vw: int, T: int, rb: int = ROWS_RB):
    """The T-input kernel with blocks of rb rows (JIT, once per process and T)."""
    return _PAR_T(lc.jit(build_rows_module(vw, T, rb=rb), ["gemm_rows_par"])["gemm_rows_par"])


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


def applies_rows(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 max_rows: int = 16) -> bool:
    """A few (1..max_rows) fp32 CPU rows x2 [T, k] against a contiguous fp32 weight big enough to split (T is
    compiled in: one kernel per row count)."""
    return (x2.dim() == 2 and 1 <= x2.shape[0] <= max_rows and applies(x2[0], weight, bias)
            and x2.dtype == torch.float32)


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


def gemm_rows(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              n_threads: int | None = None) -> torch.Tensor:
    """F.linear(x2, weight, bias) for a few rows x2 [T, k] (fp32; `applies_rows`) -> [T, n], W streamed once."""
    n, k = weight.shape
    T = x2.shape[0]
    xc = x2.contiguous()
    y = torch.empty(T, n, dtype=torch.float32)
    nt = max(1, torch.get_num_threads() if n_threads is None else n_threads)
    rb = ROWS_RB
    blocks = -(-n // rb)
    a = (ctypes.c_int64 * N_ARGS)(weight.data_ptr(), xc.data_ptr(), y.data_ptr(),
                                  0 if bias is None else bias.data_ptr(), n, k)
    compiled_rows(vector_width(), T, rb)(a, blocks, min(nt, blocks))
    return y
