"""kernels/few_rows_linear.py: the few-rows linear (draft-tree steps) against F.linear, and its scoping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetk.kernels import few_rows_linear as frl


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
    assert not frl.applies(torch.randn(1, 1, 16), w)  # one row: F.linear's GEMV is the fast path
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
            one = mlp(x[:, :1])  # one row: plain F.linear
    finally:
        frl.few_rows_linear = orig
    assert calls == [(1, 6, 16), (1, 6, 32)]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, ref[:, :1], atol=1e-5, rtol=1e-5)
    assert all("forward" not in m.__dict__ for m in linears)  # the class forward is back
