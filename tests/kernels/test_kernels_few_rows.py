"""kernels/few_rows_linear.py: the few-rows linear (draft-tree steps) and the one-row thread-parallel fp32 GEMV
(kernels/llvm_gemv_f32.py, decode steps) against F.linear, and their scoping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetk.kernels import few_rows_linear as frl
from edgetk.kernels import llvm_gemv_f32 as gv


@pytest.mark.parametrize("rows", [2, 3, 5, 9, 12])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(77, 45, generator=g)
    b = torch.randn(77, generator=g) if bias else None
    x = torch.randn(1, rows, 45, generator=g)
    got = frl.few_rows_linear(x, w, b)
    assert got.shape == (1, rows, 77)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_applies_only_to_few_fp32_cpu_rows():
    w = torch.randn(8, 16)
    assert frl.applies(torch.randn(1, 5, 16), w)
    assert not frl.applies(torch.randn(1, 1, 16), w)  # one row: the GEMV below
    assert not frl.applies(torch.randn(1, frl.MAX_ROWS + 1, 16), w)
    assert not frl.applies(torch.randn(3, 16).half(), w.half())


def test_context_manager_routes_and_restores():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    x = torch.randn(1, 6, 16)
    ref = mlp(x)
    calls = []
    orig = frl.few_rows_linear
    try:
        frl.few_rows_linear = lambda *a: calls.append(a[0].shape) or orig(*a)
        with frl.few_rows_linears(linears):
            got = mlp(x)
            one = mlp(x[:, :1])  # one row of weights below the GEMV's MIN_WEIGHTS: plain F.linear
    finally:
        frl.few_rows_linear = orig
    assert calls == [(1, 6, 16), (1, 6, 32)]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, ref[:, :1], atol=1e-5, rtol=1e-5)
    assert all("forward" not in m.__dict__ for m in linears)  # the class forward is back


@pytest.mark.parametrize("shape", [(77, 45), (576, 576), (1001, 333), (3, 130), (1536, 576)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_f32_matches_f_linear(shape, threads, bias):
    """Every row-block split (a short last block, fewer blocks than threads), column tails past the double
    vector, with and without bias."""
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(1, 1, k, generator=g)
    got = gv.gemv_f32(x, w, b, n_threads=threads)
    assert got.shape == (1, 1, n)
    # fp32 sums of k products in another order: outputs of size ~sqrt(k) differ by a few ulp (~1e-5 at k=576)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=5e-5, rtol=1e-5)


def test_gemv_applies_to_one_big_fp32_row_only():
    w = torch.randn(512, 256)
    assert gv.applies(torch.randn(1, 1, 256), w) and gv.applies(torch.randn(256), w, torch.randn(512))
    assert not gv.applies(torch.randn(1, 2, 256), w)  # two rows
    assert not gv.applies(torch.randn(1, 1, 256), torch.randn(64, 256))  # below MIN_WEIGHTS: F.linear
    assert not gv.applies(torch.randn(1, 1, 256).double(), w.double())
    assert not gv.applies(torch.randn(1, 1, 256), torch.randn(256, 512).t())  # not contiguous
    assert not gv.applies(torch.randn(1, 1, 256), w, torch.randn(512).half())


def test_context_manager_routes_one_row_to_the_gemv(monkeypatch):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 8, bias=False))  # the 2nd: too small
    x = torch.randn(1, 1, 256)
    calls = []
    orig = gv.gemv_f32
    monkeypatch.setattr(gv, "gemv_f32", lambda *a: calls.append(tuple(a[1].shape)) or orig(*a))
    with frl.few_rows_linears([mlp[0], mlp[2]]):
        got = mlp(x)
    assert calls == [(512, 256)]
    torch.testing.assert_close(got, mlp(x), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(576, 576), (1001, 333), (130, 512), (1536, 576)])
@pytest.mark.parametrize("rows,threads", [(1, 1), (2, 2), (5, 3), (12, 2), (16, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_rows_matches_f_linear(shape, rows, threads, bias):
    """The few-input fp32 kernel: any row count up to 16 (compiled per count), row splits over 1-3 threads,
    column tails past the vector width (333), with and without bias."""
    n, k = shape
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    assert gv.applies_rows(x, w, b)
    got = gv.gemm_rows(x, w, b, n_threads=threads)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=5e-5, rtol=1e-5)


def test_few_rows_linear_takes_the_kernel_for_big_weights(monkeypatch):
    """2..MAX_ROWS rows of a weight of at least MIN_WEIGHTS elements run `gemm_rows` (any leading shape); smaller
    weights, other dtypes and more rows than it compiles do not."""
    w, b = torch.randn(512, 256), torch.randn(512)
    calls = []
    orig = gv.gemm_rows
    monkeypatch.setattr(gv, "gemm_rows", lambda *a: calls.append(tuple(a[0].shape)) or orig(*a))
    x = torch.randn(1, 7, 256)
    got = frl.few_rows_linear(x, w, b)
    assert calls == ([(7, 256)] if gv.available() else []) and got.shape == (1, 7, 512)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=5e-5, rtol=1e-5)
    frl.few_rows_linear(torch.randn(3, 256), torch.randn(64, 256))  # below MIN_WEIGHTS: the BLAS form
    assert len(calls) == (1 if gv.available() else 0)
    assert not gv.applies_rows(torch.randn(17, 256), w)
    assert not gv.applies_rows(torch.randn(3, 256).double(), w.double())
    assert not gv.applies_rows(torch.randn(3, 256), w, torch.randn(512).half())
