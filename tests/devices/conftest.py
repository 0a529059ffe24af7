"""Real loopback devices for the transport tests: an sshd with a throwaway key, a TVM RPC fleet,
and small artifacts built here (an eager tiny decoder, an ONNX MLP, a TVM MLP for host + aarch64)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetk.devices.transports.loopback import LoopbackSshd as Sshd


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

    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, max_seq_len=128, tie_embeddings=True)
    out = tmp_path_factory.mktemp("art") / "tiny-decoder"
    save(LoadedModel("tiny", "decoder", llama.init_random(cfg, seed=0), config=cfg), out)
    return out
