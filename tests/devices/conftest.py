"""Real loopback devices for the transport tests: an sshd with a throwaway key, a TVM RPC fleet,
and small artifacts built here (an eager tiny decoder, an ONNX MLP, a TVM MLP for host + aarch64)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, root: Path):
        from edgetk.devices.toolchains import require_tool

        self.root = root
        self.sshd = require_tool("sshd")
        self.port = _free_port()
        self.key = root / "client_key"
        self.wrong_key = root / "wrong_key"
        for k in (root / "host_key", self.key, self.wrong_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True, timeout=30)
        shutil.copy(f"{self.key}.pub", root / "authorized_keys")
        (root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
            f"PidFile {root / 'sshd.pid'}", "UsePAM no", "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "StrictModes no", "MaxStartups 50",
            "MaxSessions 50", "LogLevel ERROR", "Subsystem sftp internal-sftp", ""]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.proc = None

    def start(self) -> "Sshd":
        self.proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.root / "sshd.log", "wb"),
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("sshd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=10)

    def spec(self, key: Path | None = None, **q: str) -> str:
        import sys

        query = {"key": str(key or self.key), "python": sys.executable,
                 "known_hosts": str(self.root / "known_hosts"), **q}
        return f"ssh://{os.environ.get('USER', 'root')}@127.0.0.1:{self.port}?" + "&".join(f"{k}={v}" for k, v in query.items())


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    d = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def rpc_fleet():
    from edgetk.devices.transports.rpc import LocalFleet

    with LocalFleet("host-x86", servers=2) as fleet:
        yield fleet


@pytest.fixture(scope="session")
def onnx_mlp(tmp_path_factory) -> Path:
    """A small ONNX MLP built with onnx.helper, as an "onnx" artifact (Session backend "onnx")."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgetk.artifact import ArtifactWriter

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32) * 0.2, "w1")
    b1 = numpy_helper.from_array(np.zeros(64, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32) * 0.2, "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Erf", ["m"], ["y"])]  # Erf: not in the NPU op set -> CPU fallback
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [w1, b1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    out = tmp_path_factory.mktemp("art") / "mlp-onnx"
    with ArtifactWriter(out, kind="onnx", format="onnx", file="model.onnx", model_kind="module",
                        inputs={"names": ["x"], "shapes": [[4, 32]], "dtypes": ["float32"]},
                        outputs={"names": ["y"]}) as w:
        onnx.save(m, str(w.path("model.onnx")))
    return out


@pytest.fixture(scope="session")
def tvm_mlp(tmp_path_factory) -> Path:
    """A small MLP exported to TVM for rpi5: host library + aarch64 library (edgetk.exporters.tvm)."""
    import torch
    from torch import nn

    import edgetk

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    out = tmp_path_factory.mktemp("art") / "mlp-tvm"
    edgetk.export(m, (torch.randn(4, 64),), format="tvm", target="rpi5", out=out)
    return out


@pytest.fixture(scope="session")
def tiny_decoder_art(tmp_path_factory) -> Path:
    from edgetk.compressed import save
    from edgetk.models import LoadedModel, llama

    from tests.conftest import TINY_LLAMA

    out = tmp_path_factory.mktemp("art") / "tiny-decoder"
    save(LoadedModel("tiny", "decoder", llama.init_random(TINY_LLAMA, seed=0), config=TINY_LLAMA), out)
    return out
