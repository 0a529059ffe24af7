"""ExecuTorch's to_executorch() reads graph-signature maps once per placeholder; the exporter memoizes them
(exporters/executorch.py `signature_maps_memoized`) so a model with many lifted buffers does not export in
quadratic time. Checked by counting the reads, not by timing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import edgetk
from edgetk.runtimes import Session

pytest.importorskip("executorch.exir", reason="executorch is the 'executorch' extra")
from executorch.exir.program._program import EdgeProgramManager  # noqa: E402
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument  # noqa: E402

from edgetk.exporters.executorch import _MEMOIZED_MAPS, signature_maps_memoized  # noqa: E402

pytestmark = pytest.mark.backend


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(3):
            self.register_buffer(f"b{i}", torch.full((2,), float(i)))

    def forward(self, x):
        return x + sum(getattr(self, f"b{i}") for i in range(3))


def _properties() -> dict:
    return {n: ExportGraphSignature.__dict__[n] for n in _MEMOIZED_MAPS}


def test_executorch_signature_maps_memoized_and_restored():
    before = _properties()
    sig = torch.export.export(Buffers(), (torch.ones(2),)).graph_signature
    fresh = dict(sig.inputs_to_buffers)
    with signature_maps_memoized():
        with signature_maps_memoized():  # nested: one installation
            first = sig.inputs_to_buffers
            assert sig.inputs_to_buffers is first and dict(first) == fresh
        assert sig.inputs_to_buffers is first  # still installed: the outer block has not exited
        sig.input_specs.append(InputSpec(InputKind.BUFFER, TensorArgument("b_new"), "new", persistent=True))
        assert sig.inputs_to_buffers["b_new"] == "new"  # a grown list is not served from the memo
        sig.input_specs = sig.input_specs[:-1]
        assert "b_new" not in sig.inputs_to_buffers  # nor a replaced one
    assert _properties() == before
    with pytest.raises(RuntimeError, match="boom"):
        with signature_maps_memoized():
            raise RuntimeError("boom")
    assert _properties() == before and dict(sig.inputs_to_buffers) == fresh


class ManyBuffers(nn.Module):
    """Many lifted buffers (as a compressed decoder has: 7 per VQ linear) in a small graph."""

    def __init__(self, n: int, d: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.n = n
        for i in range(n):
            self.register_buffer(f"w{i}", torch.randn(d, generator=g))

    def forward(self, x):
        w = torch.stack([getattr(self, f"w{i}") for i in range(self.n)])  # [n, d]
        return torch.tanh(x @ w.T)


def test_executorch_many_buffers_read_signature_maps_once(tmp_path, monkeypatch):
    """Without the memo, to_executorch() rebuilds inputs_to_buffers a few times per placeholder."""
    reads = {"in_to_executorch": False, "n": 0}
    original = ExportGraphSignature.__dict__["inputs_to_buffers"]

    def counting(sig):
        reads["n"] += reads["in_to_executorch"]
        return original.fget(sig)

    to_executorch = EdgeProgramManager.to_executorch

    def flagged(self, *a, **kw):
        reads["in_to_executorch"] = True
        try:
            return to_executorch(self, *a, **kw)
        finally:
            reads["in_to_executorch"] = False

    monkeypatch.setattr(ExportGraphSignature, "inputs_to_buffers", property(counting))
    monkeypatch.setattr(EdgeProgramManager, "to_executorch", flagged)
    m = ManyBuffers(120).eval()
    art = edgetk.export(m, (torch.randn(1, 8),), format="executorch", out=tmp_path / "a")
    assert 0 < reads["n"] <= 10, reads
    assert ExportGraphSignature.__dict__["inputs_to_buffers"].fget is counting  # the memo restored what it found
    x = torch.randn(1, 8)
    with torch.no_grad():
        np.testing.assert_allclose(Session(art).run([x])[0], m(x).numpy(), atol=1e-4, rtol=1e-4)
