"""The Python API on a small CNN (conv, batch norm, depthwise conv, pooling): ONNX and ExecuTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgetk
from edgetk.artifact import Artifact
from edgetk.runtimes import Session
from helpers_export import small_cnn


@pytest.mark.backend
@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_cnn_export_runs_in_runtime(cnn_artifacts, fmt):
    model = small_cnn()
    art = cnn_artifacts(fmt)
    m = json.loads((art.root / "manifest.json").read_text())
    assert m["kind"] == fmt and m["format"] == fmt
    assert m["inputs"] == {"names": ["x"], "shapes": [[2, 3, 32, 32]], "dtypes": ["float32"]}
    assert m["outputs"]["names"] == ["output"] and m["outputs"]["shapes"] == [[2, 10]]
    assert m["parity"]["outputs"]["output"]["max_abs"] <= m["parity"]["outputs"]["output"]["limit"]
    assert m["parity"]["atol"] == 1e-4
    # reload from disk (hash-verified) and run on new data
    sess = Session(Artifact.load(art.root))
    x2 = torch.randn(2, 3, 32, 32)
    got = sess.run([x2])[0]
    with torch.no_grad():
        ref = model(x2).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert art.total_bytes > sum(p.numel() for p in model.parameters()) * 4 * 0.9  # fp32 weights are in it
    if fmt == "executorch":
        assert m["executorch"]["xnnpack_ops"] == "all" and m["executorch"]["delegate_calls"] >= 1


@pytest.mark.backend
def test_onnx_dynamic_batch(tmp_path):
    model = small_cnn()
    batch = torch.export.Dim("batch", min=1, max=64)
    art = edgetk.export(model, (torch.randn(2, 3, 16, 16),), format="onnx", out=tmp_path / "a",
                        dynamic_shapes=({0: batch},))
    x = torch.randn(5, 3, 16, 16)
    got = Session(art).run([x])[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)
