"""edgetk::blockwise_gemm (RTN-quantized Linears): reference vs decomposition, and the exports — ONNX as
onnxruntime's native com.microsoft.MatMulNBits with the codes kept packed, ExecuTorch and TVM decomposed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import edgetk
from edgetk.compress.rtn import RTNLinear
from edgetk.exporters.common import CUSTOM_OPS
from edgetk.kernels import blockwise_gemm as bwg
from edgetk.runtimes import Session

# (bits, group, in_features, bias): odd in_features pad the last block
VARIANTS = {"2bit-g32": (2, 32, 96, True), "2bit-g64-pad": (2, 64, 100, False), "4bit-g16": (4, 16, 48, True),
            "3bit-g64-plain": (3, 64, 128, True)}


def rtn_linear(bits, group, in_f, bias, out_f=40, seed=0) -> RTNLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    return RTNLinear.quantize(w, torch.randn(out_f, generator=g) if bias else None, bits, group)


class RTNMLP(nn.Module):
    def __init__(self, d=256, hidden=512, bits=2, group=32):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.up = RTNLinear.quantize(torch.randn(hidden, d, generator=g) * 0.05, None, bits, group)
        self.down = RTNLinear.quantize(torch.randn(d, hidden, generator=g) * 0.05, torch.zeros(d), bits, group)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reference_and_decomposition_match_dense(name):
    bits, group, in_f, bias = VARIANTS[name]
    m = rtn_linear(bits, group, in_f, bias)
    x = torch.randn(3, 5, in_f)
    args = (m.codes, m.scale, m.lo, m.bias, in_f, bits, group)
    dense = torch.nn.functional.linear(x, m.dequantize(), m.bias.float() if bias else None)
    torch.testing.assert_close(bwg.blockwise_gemm_reference(x, *args), dense)
    decomposed = CUSTOM_OPS["edgetk::blockwise_gemm"].decomposition
    torch.testing.assert_close(decomposed(x, *args), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x), dense)


def test_native_onnx_formats():
    assert bwg.native_onnx(2, 32) and bwg.native_onnx(4, 64)
    assert not bwg.native_onnx(3, 64) and not bwg.native_onnx(8, 64) and not bwg.native_onnx(2, 48)
    assert not bwg.native_onnx(2, 8)


@pytest.mark.backend
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_onnx_uses_matmulnbits(tmp_path, name):
    import onnx

    bits, group, in_f, bias = VARIANTS[name]
    m = rtn_linear(bits, group, in_f, bias)
    x = torch.randn(2, 3, in_f)
    art = edgetk.export(m, (x,), format="onnx", out=tmp_path / "a")
    par = art.manifest["parity"]["outputs"]["output"]
    assert par["max_abs"] <= par["limit"]
    model = onnx.load(str(art.file("model.onnx")))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    native = bwg.native_onnx(bits, group)
    assert (ops.count(("com.microsoft", "MatMulNBits")) == 1) == native
    if native:
        assert art.manifest["onnx"]["native_ops"] == ["com.microsoft.MatMulNBits"]
        assert art.manifest["compression"]["custom_ops"]["edgetk::blockwise_gemm"]["count"] == 1
    x2 = torch.randn(2, 3, in_f)
    np.testing.assert_allclose(Session(art).run([x2.numpy()])[0], m(x2).detach().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.backend
def test_onnx_keeps_rtn_codes_packed_with_optimizer(tmp_path):
    import onnx

    m = RTNMLP()
    art = edgetk.export(m, (torch.randn(1, 256),), format="onnx", out=tmp_path / "a", optimize=True)
    model = onnx.load(str(art.file("model.onnx")))
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 2
    inits = {i.name: (i.data_type, int(np.prod(i.dims))) for i in model.graph.initializer}
    big_float = [k for k, (dt, n) in inits.items()
                 if dt in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and n >= 256 * 512 // 8]
    assert not big_float, f"a dense weight was folded into the file: {big_float}"
    stored = sum(b.numel() * b.element_size() for b in m.buffers())  # 2 bits + fp16 scale/lo per 32 = 3 bpw
    assert art.manifest["files"]["model.onnx"]["bytes"] < 1.10 * stored + 4096


@pytest.mark.backend
@pytest.mark.parametrize("fmt", ["executorch", "tvm"])
def test_other_formats_decompose(tmp_path, fmt):
    m = RTNMLP(d=64, hidden=128)
    x = torch.randn(2, 64)
    art = edgetk.export(m, (x,), format=fmt, out=tmp_path / "a")
    par = art.manifest["parity"]["outputs"]["output"]
    assert par["max_abs"] <= par["limit"]
    assert art.manifest["compression"]["custom_ops"]["edgetk::blockwise_gemm"]["lowering"] == "decompose"
    np.testing.assert_allclose(Session(art).run([x.numpy()])[0], m(x).detach().numpy(), atol=1e-4, rtol=1e-4)
