"""edgetk::codebook_gemm through ONNX (edgetk-domain node + function body) and ExecuTorch (decomposed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import edgetk
from edgetk.exporters.common import codebook_gemm_decomposed
from edgetk.kernels.codebook_gemm import codebook_gemm_reference, dequantize
from edgetk.runtimes import Session
from helpers_export import CodebookLinear, CodebookMLP

VARIANTS = {
    "2bit": dict(bits=2),
    "3bit-outliers-2stage": dict(in_f=50, bits=3, stages=2, n_outliers=5),
    "8bit-groups-nobias": dict(bits=8, groups=4, scale=False, bias=False),
    "4bit-pad-vec6": dict(in_f=46, vec_len=6, bits=4, groups=2),
    "4bit-2stage-groups": dict(in_f=64, bits=4, stages=2, groups=2),  # vq2-r16's format (16 codewords per stage)
}


def _args(m: CodebookLinear):
    return (m.codes, m.codebooks, m.perm, m.outlier_w, m.scale, m.bias, *m.meta)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_decomposition_matches_reference(name):
    m = CodebookLinear(**VARIANTS[name])
    x = torch.randn(3, 5, m.meta[0])
    ref = codebook_gemm_reference(x, *_args(m))
    got = codebook_gemm_decomposed(x, *_args(m))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    dense = x @ dequantize(m.codes, m.codebooks, m.perm, m.outlier_w, m.scale, *m.meta).T
    dense = dense + (m.bias if m.bias.numel() else 0)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)


# every variant through ONNX; ExecuTorch (slower to lower) through the VQLinear and MLP tests below
PARITY_CASES = [("onnx", n) for n in sorted(VARIANTS)]


@pytest.mark.backend
@pytest.mark.parametrize("fmt,name", PARITY_CASES)
def test_codebook_gemm_export_parity(tmp_path, fmt, name):
    m = CodebookLinear(**VARIANTS[name])
    x = torch.randn(2, 3, m.meta[0])
    art = edgetk.export(m, (x,), format=fmt, out=tmp_path / "a")
    par = art.manifest["parity"]
    assert par["outputs"]["output"]["max_abs"] <= par["outputs"]["output"]["limit"]
    assert art.manifest["compression"]["custom_ops"]["edgetk::codebook_gemm"]["count"] == 1
    # fresh inputs through the loaded artifact, against the kernels/ reference
    x2 = torch.randn(2, 3, m.meta[0])
    got = Session(art).run([x2.numpy()])[0]
    np.testing.assert_allclose(got, codebook_gemm_reference(x2, *_args(m)).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.backend
def test_onnx_keeps_codes_compressed_with_optimizer(tmp_path):
    import onnx

    m = CodebookMLP(d=256, hidden=512, bits=2)
    dense_bytes = 2 * 256 * 512 * 4
    art = edgetk.export(m, (torch.randn(1, 256),), format="onnx", target="rpi5", out=tmp_path / "a", optimize=True)
    assert art.manifest["target"]["name"] == "rpi5"
    model = onnx.load(str(art.file("model.onnx")))
    nodes = [(n.domain, n.op_type) for n in model.graph.node]
    assert nodes.count(("edgetk", "CodebookGemm")) == 2
    assert [f"{f.domain}.{f.name}" for f in model.functions] == ["edgetk.CodebookGemm"]
    inits = {i.name: (i.data_type, tuple(i.dims)) for i in model.graph.initializer}
    big_float = [k for k, (dt, dims) in inits.items()
                 if dt in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and int(np.prod(dims)) >= 256 * 512 // 8]
    assert not big_float, f"a dense weight was folded into the file: {big_float}"
    assert sum(1 for dt, _ in inits.values() if dt == onnx.TensorProto.UINT8) == 2
    assert art.manifest["files"]["model.onnx"]["bytes"] < dense_bytes / 8
    assert model.ir_version <= 10


@pytest.mark.backend
def test_executorch_keeps_codes_compressed(tmp_path):
    m = CodebookMLP(d=256, hidden=512, bits=2)
    dense_bytes = 2 * 256 * 512 * 4
    art = edgetk.export(m, (torch.randn(1, 256),), format="executorch", out=tmp_path / "a")
    assert art.manifest["executorch"]["custom_op_lowering"] == "decompose"
    assert art.manifest["compression"]["custom_ops"]["edgetk::codebook_gemm"]["lowering"] == "decompose"
    # codes 2 x 32 KB + codebooks; a dense fp32 copy would be 1 MB
    assert art.manifest["files"]["model.pte"]["bytes"] < dense_bytes / 8
    x = torch.randn(1, 256)
    with torch.no_grad():
        np.testing.assert_allclose(Session(art).run([x])[0], m(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.backend
@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_vqlinear_export(tmp_path, fmt):
    """The VQ method's own layer (int16 perm, fp16 outliers/scale/bias, residual stage, groups, 6-bit codes)."""
    from edgetk.compress.vq_linear import VQLinear
    from edgetk.kernels.codebook_gemm import CodebookFormat

    f = CodebookFormat(out_features=64, in_features=70, vec_len=4, code_bits=6, codebook_size=64, stages=2,
                       groups=2, n_outliers=6, has_scale=True, has_bias=True)
    g = torch.Generator().manual_seed(3)
    layer = VQLinear.from_parts(f, torch.randint(0, 64, (2, 64, f.n_vec), generator=g),
                                torch.randn(2, 2, 64, 4, generator=g), torch.randperm(70, generator=g),
                                torch.randn(64, 6, generator=g), torch.rand(64, generator=g) + 0.5,
                                torch.randn(64, generator=g))
    x = torch.randn(1, 3, 70)
    art = edgetk.export(layer, (x,), format=fmt, out=tmp_path / "a")
    assert art.manifest["compression"]["custom_ops"]["edgetk::codebook_gemm"]["count"] == 1
    x2 = torch.randn(1, 3, 70)
    with torch.no_grad():
        ref = x2 @ layer.dequantize().T + layer.bias.float()
    np.testing.assert_allclose(Session(art).run([x2])[0], ref.numpy(), atol=1e-4, rtol=1e-4)
