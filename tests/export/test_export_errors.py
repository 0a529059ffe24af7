"""Bad input: untraceable models, dynamic shapes a target cannot take, ops missing on a target,
truncated artifacts, parity failures. Each raises a named edgetk error and leaves nothing on disk."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import edgetk
from edgetk.artifact import sha256_file
from edgetk.errors import ArtifactError, ConfigError, ParityError, UnsupportedOpError
from edgetk.exporters.common import TargetInfo, Tolerance, compare
from edgetk.runtimes import Session
from helpers_export import small_cnn


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x - 1


@torch.library.custom_op("edgetk_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) * 3


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesMystery(nn.Module):
    def forward(self, x):
        return torch.ops.edgetk_test.mystery(x) + 1


_CALLS = [0]


class Stateful(nn.Module):
    """Python state (a global call counter) the trace bakes in as a constant: eager drifts from the graph."""

    def forward(self, x):
        _CALLS[0] += 1
        return x * _CALLS[0]


@pytest.mark.backend
@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_untraceable_model_is_named(tmp_path, fmt):
    with pytest.raises(UnsupportedOpError, match="data-dependent control flow") as info:
        edgetk.export(Branchy(), (torch.randn(4),), format=fmt, out=tmp_path / "a")
    assert "torch.cond" in info.value.hint
    assert not (tmp_path / "a").exists()


@pytest.mark.backend
@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_custom_op_without_lowering(tmp_path, fmt):
    with pytest.raises(UnsupportedOpError) as info:
        edgetk.export(UsesMystery(), (torch.randn(2, 3),), format=fmt, out=tmp_path / "a")
    msg = str(info.value)
    assert "edgetk_test::mystery" in msg and fmt in msg and "target host" in msg and "node 'mystery'" in msg
    for option in ("fall back", "decompose", "drop the target"):
        assert option in info.value.hint
    assert not (tmp_path / "a").exists()


@pytest.mark.backend
def test_op_missing_on_target_op_set(tmp_path):
    npu = {"name": "toy-npu", "static_shapes": True,
           "ops": ["aten.convolution", "aten.relu", "aten.add", "aten.mean", "aten.view", "aten.linear"]}
    with pytest.raises(UnsupportedOpError, match=r"aten::(_native_batch_norm|batch_norm|max_pool2d).*toy-npu"):
        edgetk.export(small_cnn(), (torch.randn(1, 3, 16, 16),), format="onnx", target=npu, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.backend
@pytest.mark.parametrize("target", ["snapdragon-8gen3", TargetInfo(name="static-npu", static_shapes=True)])
def test_dynamic_shapes_refused_by_static_target(tmp_path, target):
    name = target if isinstance(target, str) else target.name
    with pytest.raises(UnsupportedOpError, match=f"target {name} needs static shapes"):
        edgetk.export(small_cnn(), (torch.randn(2, 3, 16, 16),), format="onnx", target=target,
                      out=tmp_path / "a", dynamic_shapes=({0: torch.export.Dim("batch", max=8)},))
    assert not (tmp_path / "a").exists()


@pytest.mark.backend
def test_unknown_target_profile(tmp_path):
    with pytest.raises(ConfigError, match="unknown target 'no-such-board'"):
        edgetk.export(small_cnn(), (torch.randn(1, 3, 8, 8),), format="onnx", target="no-such-board",
                      out=tmp_path / "a")


@pytest.mark.backend
def test_executorch_needs_bounded_dynamic_dims(tmp_path):
    with pytest.raises(UnsupportedOpError, match="no upper bound") as info:
        edgetk.export(small_cnn(), (torch.randn(2, 3, 16, 16),), format="executorch", out=tmp_path / "a",
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert "max=" in info.value.hint


@pytest.mark.backend
def test_parity_failure_names_output_and_writes_nothing(tmp_path):
    with pytest.raises(ParityError, match="output 'output' diverges"):
        edgetk.export(Stateful(), (torch.ones(3),), format="onnx", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert not [p for p in tmp_path.iterdir()]  # no temp directory left either


def test_compare_names_first_diverging_output():
    ref = [np.zeros(3), np.ones(3), np.ones(3)]
    got = [np.zeros(3), np.ones(3) + 1e-3, np.ones(3) + 1.0]
    with pytest.raises(ParityError, match="'b' diverges"):
        compare(["a", "b", "c"], got, ref, Tolerance(1e-4, 1e-4), "parity")
    per = compare(["a", "b"], got[:2], ref[:2], Tolerance(1e-2, 0), "parity")
    assert per["b"]["max_abs"] == pytest.approx(1e-3)


@pytest.mark.backend
def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="format"):
        edgetk.export(small_cnn(), (torch.randn(1, 3, 8, 8),), format="tflite", out=tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown export option"):
        edgetk.export(small_cnn(), (torch.randn(1, 3, 8, 8),), format="onnx", out=tmp_path / "a", speed=3)
    with pytest.raises(ConfigError, match="example_inputs"):
        edgetk.export(small_cnn(), None, format="onnx", out=tmp_path / "a")


def _rehash(art_dir, name):
    mpath = art_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    p = art_dir / name
    m["files"][name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    mpath.write_text(json.dumps(m))


@pytest.mark.backend
@pytest.mark.parametrize("fmt,name", [("onnx", "model.onnx"), ("executorch", "model.pte")])
def test_truncated_model_file(tmp_path, cnn_artifacts, fmt, name):
    shutil.copytree(cnn_artifacts(fmt).root, tmp_path / "a")
    f = tmp_path / "a" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated or modified"):
        Session(tmp_path / "a")
    _rehash(tmp_path / "a", name)  # hashes now match: the runtime itself must reject the file, by name
    with pytest.raises(ArtifactError, match=f"cannot load {name}") as info:
        Session(tmp_path / "a")
    assert "re-export" in info.value.hint
