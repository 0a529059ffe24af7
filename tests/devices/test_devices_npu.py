"""NPU path: static shapes, static int8 QDQ quantization with calibration, per-node placement report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgetk.devices.profile import load_profile
from edgetk.errors import ConfigError, UnsupportedOpError

pytestmark = pytest.mark.backend


def test_npu_compile_mlp(onnx_mlp, tmp_path):
    import onnx

    from edgetk.artifact import Artifact
    from edgetk.devices.compile import compile_artifact
    from edgetk.runtimes import Session

    art = compile_artifact(onnx_mlp, "snapdragon-8gen3", tmp_path / "npu")
    m = onnx.load(str(art.file("model.onnx")))
    assert all(d.dim_value > 0 for i in m.graph.input for d in i.type.tensor_type.shape.dim)  # static
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert {i.data_type for i in m.graph.initializer if i.name.endswith("_quantized")} == {onnx.TensorProto.INT8}
    rep = json.loads(art.file("placement.json").read_text())
    assert len(rep["nodes"]) == len(m.graph.node)  # every node listed
    by_op = {r["op"]: r for r in rep["nodes"]}
    assert by_op["MatMul"]["unit"] == "NPU"
    assert by_op["Erf"]["unit"] == "CPU" and "not in the" in by_op["Erf"]["reason"]
    s = rep["summary"]
    assert s["cpu_fallback_ops"].get("Erf") == 1 and 0 < s["npu_fraction"] < 1
    assert "| Erf | CPU |" in art.file("placement.md").read_text()
    # the quantized graph still computes the float model's function (int8 error, not garbage)
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    ref = Session(Artifact.load(onnx_mlp)).run([x])[0]
    got = Session(art).run([x])[0]
    snr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
    assert snr > 15, snr


def test_npu_int16_activations_and_placement_dtype(onnx_mlp, tmp_path):
    from edgetk.artifact import Artifact
    from edgetk.devices.npu import compile_npu

    art = compile_npu(Artifact.load(onnx_mlp), load_profile("snapdragon-8gen3"), tmp_path / "npu16",
                      activation_dtype="int16")
    rep = json.loads(art.file("placement.json").read_text())
    assert rep["summary"]["activation_dtype"] == "int16"
    assert any("int16" in r["reason"] for r in rep["nodes"] if r["op"] == "MatMul")
    with pytest.raises(ConfigError, match="activation dtype 'int4'"):
        compile_npu(Artifact.load(onnx_mlp), load_profile("snapdragon-8gen3"), tmp_path / "x", activation_dtype="int4")


def test_npu_rejects_non_onnx_and_no_npu(tvm_mlp, onnx_mlp, tmp_path):
    from edgetk.artifact import Artifact
    from edgetk.devices.npu import compile_npu

    with pytest.raises(UnsupportedOpError, match="quantizes ONNX graphs"):
        compile_npu(Artifact.load(tvm_mlp), load_profile("snapdragon-8gen3"), tmp_path / "a")
    with pytest.raises(ConfigError, match="has no NPU"):
        compile_npu(Artifact.load(onnx_mlp), load_profile("rpi5"), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
