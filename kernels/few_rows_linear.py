"""fp32 `F.linear` for a few rows (2..`MAX_ROWS` tokens: a speculative-decoding tree, a short chunk) on CPU.

x · Wᵀ with a handful of rows is memory bound like a GEMV, but CPU BLAS (MKL here) treats it as a GEMM and
packs W first, so 2–9 rows cost 1.6–2.5× one row. Weights of at least `llvm_gemv_f32.MIN_WEIGHTS` elements go to
`llvm_gemv_f32.gemm_rows` (each weight vector loaded once for all rows, weight rows split over the threads): on 2 AVX2
cores (Zen 3) 1.3–1.9× faster than the BLAS form below on smollm2's block weights and head at 2–12 rows, the
49152 × 576 head at 5 rows 13.8 → 8.4 ms, about one row's time (old and new interleaved). Others are computed as
(W · xᵀ)ᵀ — W the left operand, xᵀ a transposed view — so that the same BLAS streams W once: smollm2-135m's 210
block weights, 2 threads: 1 row 60 ms, F.linear 3/5/9 rows 159/110/154 ms, this form 61/72/70 ms; from ~13 rows
on the two are equal (`python benchmarks/llm_decode.py --part linear`). Same result as F.linear up to summation
order (tests/kernels/test_kernels_few_rows.py).

`few_rows_linears(modules)` routes the given nn.Linear modules' fp32 CPU inputs of 2..MAX_ROWS rows there, and
single rows to `llvm_gemv_f32` (MKL's sgemv is single-threaded); the eager decoder enables it around every step of
at most MAX_ROWS tokens. Anything else goes to F.linear unchanged.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import llvm_gemv_f32 as gemv

MAX_ROWS = 12


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) through `llvm_gemv_f32.gemm_rows` where it applies, else as (weight · x2ᵀ)ᵀ (x2 = x
    flattened to rows)."""
    x2 = x.reshape(-1, x.shape[-1])
    if gemv.applies_rows(x2, weight, bias) and gemv.available():
        y = gemv.gemm_rows(x2, weight, bias)
    else:
        y = torch.mm(weight, x2.t()).t()
        if bias is not None:
            y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    return (2 <= rows <= max_rows and weight.dim() == 2 and x.dtype == weight.dtype == torch.float32
            and x.device.type == weight.device.type == "cpu" and not weight.is_sparse)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if applies(x, self.weight):
        return few_rows_linear(x, self.weight, self.bias)
    if gemv.applies(x, self.weight, self.bias) and gemv.available():
        return gemv.gemv_f32(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


@contextmanager
def few_rows_linears(linears: list[nn.Linear]):
    """Inside the block the given nn.Linear modules compute 2..MAX_ROWS-row inputs with `few_rows_linear`, and
    one-row fp32 inputs with the thread-parallel GEMV of `llvm_gemv_f32` (weights of at least its MIN_WEIGHTS
    elements; MKL's sgemv runs on one thread) -- an instance-level forward, removed on exit; one attribute per
    module, no per-op dispatch cost."""
    for m in linears:
        m.forward = types.MethodType(_forward, m)
    try:
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
