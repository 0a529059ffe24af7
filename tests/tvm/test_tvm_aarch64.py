"""The aarch64 TVM runtime, the cross-compiled runner and qemu runs (devices/tvm_aarch64.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetk.errors import DeviceError

tvm = pytest.importorskip("tvm", reason="apache-tvm is the 'tvm' extra")
from edgetk.devices import tvm_aarch64 as ta  # noqa: E402

pytestmark = pytest.mark.backend


class TwoOutputs(torch.nn.Module):
    """int64 and float inputs, a tuple of outputs of two dtypes."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, ids, scale):
        h = self.emb(ids) * scale
        return self.lin(h).relu(), ids * 2


@pytest.fixture(scope="module")
def aarch64_lib(tmp_path_factory):
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = TwoOutputs().eval()
    args = (torch.tensor([[1, 4, 9]]), torch.tensor([0.5]))
    ep = torch.export.export(model, args)
    ex = tvm.compile(from_exported_program(ep),
                     target=tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    path = tmp_path_factory.mktemp("a64") / "m.so"
    ex.export_library(str(path), cc="aarch64-linux-gnu-gcc")
    return model, path


def test_runtime_is_cached_and_not_fetched_again(monkeypatch):
    rt = ta.aarch64_runtime()
    assert (rt.lib_dir / "libtvm_runtime.so").is_file() and rt.runner.is_file()
    assert rt.runner.read_bytes()[18:20] == (183).to_bytes(2, "little")  # an aarch64 executable

    def boom(*a, **k):
        raise AssertionError("the cached runtime must not be downloaded or rebuilt")

    monkeypatch.setattr(ta, "_download", boom)
    monkeypatch.setattr(ta, "_build_runner", boom)
    assert ta.aarch64_runtime() == rt


def test_run_under_qemu_matches_eager(aarch64_lib):
    model, lib = aarch64_lib
    ids, scale = torch.tensor([[3, 0, 7]]), torch.tensor([1.5])
    outs, timing = ta.run_aarch64_timed(lib, [ids.numpy(), scale.numpy()], repeat=3)
    with torch.no_grad():
        ref = [t.numpy() for t in model(ids, scale)]
    assert [o.dtype for o in outs] == [np.float32, np.int64]
    np.testing.assert_allclose(outs[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outs[1], ref[1])
    assert len(timing["run_ms"]) == 3 and timing["load_ms"] > 0


def test_errors_are_named(tmp_path, aarch64_lib, monkeypatch):
    _, lib = aarch64_lib
    with pytest.raises(DeviceError, match="no TVM library"):
        ta.run_aarch64(tmp_path / "missing.so", [])
    with pytest.raises(DeviceError, match="failed"):  # wrong number of inputs: the VM refuses, the run fails
        ta.run_aarch64(lib, [np.zeros((1, 3), np.int64)])
    with pytest.raises(DeviceError, match="dtype"):
        ta.write_inputs([np.zeros(2, np.complex64)], tmp_path)
    (tmp_path / "outputs.txt").write_text("float32 1 8 out_0.bin\n")
    (tmp_path / "out_0.bin").write_bytes(b"\0" * 12)
    with pytest.raises(DeviceError, match="truncated"):
        ta.read_outputs(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DeviceError, match="qemu-aarch64.*apt-get install qemu-user"):
        ta.run_aarch64(lib, [np.zeros((1, 3), np.int64), np.ones(1, np.float32)])
