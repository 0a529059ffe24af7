"""The distillation KL (`compress.distill`): value and gradient equal the log_softmax formulation, across chunk
boundaries and for bf16 logits; mismatched shapes are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetk.compress import distill


def _reference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) per row, the plain way."""
    tl = F.log_softmax(t.float(), -1)
    return (tl.exp() * (tl - F.log_softmax(s.float(), -1))).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3 * 301, 1 << 22])  # 7 rows in chunks of 3 + 3 + 1, and in one chunk
def test_kl_rows_matches_log_softmax(monkeypatch, dtype, chunk):
    monkeypatch.setattr(distill, "CHUNK_ELEMS", chunk)
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(7, 301, generator=g) * 4).to(dtype)
    s0 = (t.float() + torch.randn(7, 301, generator=g)).to(dtype)
    w = torch.rand(7, generator=g)  # unequal row weights: the backward scales each row by its own gradient

    s_ref = s0.clone().requires_grad_(True)
    ref = _reference(s_ref, t)
    (ref * w).sum().backward()

    s = s0.clone().requires_grad_(True)
    kl = distill.kl_rows(s, distill.soft_targets(t))
    (kl * w).sum().backward()

    assert kl.dtype == torch.float32 and kl.shape == (7,)
    # h + logsumexp(s) - <p, s> cancels terms of ~|logit| size: float32 rounding of those, ~1e-6 * 10
    assert float((kl - ref).detach().abs().max()) < 5e-5
    assert s.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * float(s_ref.grad.float().abs().max())
    assert float((s.grad.float() - s_ref.grad.float()).abs().max()) <= tol
    assert float(kl.detach().min()) > 0  # a different student: KL strictly positive


def test_kl_rows_of_the_teacher_itself_is_zero_and_batched_shapes_flatten():
    t = torch.randn(2, 5, 64)
    kl = distill.kl_rows(t, distill.soft_targets(t))
    assert kl.shape == (10,)
    assert float(kl.abs().max()) < 1e-5
    p, h = distill.soft_targets(t)
    assert torch.allclose(p.sum(-1), torch.ones(10)) and bool((h <= 0).all())  # sum p log p <= 0


def test_kl_rows_refuses_mismatched_targets():
    with pytest.raises(ValueError, match="do not match"):
        distill.kl_rows(torch.randn(4, 10), distill.soft_targets(torch.randn(4, 12)))
