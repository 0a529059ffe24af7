"""TVM export (exporters/tvm.py) and its Session (runtimes/tvm_session.py): a 2-bit-class VQ decoder built
for Jetson Orin Nano (host library + aarch64 library run under qemu + CUDA code), a small CNN, and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from edgetk.artifact import ArtifactWriter
from edgetk.errors import ArtifactError, UnsupportedOpError
from edgetk.kernels import table
from edgetk.models import llama

pytest.importorskip("tvm", reason="apache-tvm is the 'tvm' extra")
from edgetk.compress.vq_linear import VQLinear  # noqa: E402
from edgetk.exporters import export  # noqa: E402
from edgetk.exporters.decoder import DecoderStep, StepKVCache, cache_installed  # noqa: E402
from edgetk.kernels.codebook_gemm import CodebookFormat  # noqa: E402
from edgetk.runtimes import Session  # noqa: E402

pytestmark = pytest.mark.backend
CFG = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, max_seq_len=128, tie_embeddings=True)
MAX_SEQ = 48


def vq_from_linear(lin: nn.Linear, seed: int, **fmt_kw) -> VQLinear:
    """Nearest-codeword VQ of a Linear (codebook = sampled weight vectors); quality is not the point here."""
    out_f, in_f = lin.weight.shape
    fmt = CodebookFormat(out_f, in_f, vec_len=4, code_bits=8, codebook_size=256, **fmt_kw)
    g = torch.Generator().manual_seed(seed)
    w = lin.weight.detach()
    perm = torch.randperm(in_f, generator=g) if fmt.n_outliers else None
    wp = w[:, perm] if perm is not None else w
    vecs = wp[:, fmt.n_outliers:].reshape(-1, 4)
    cb = vecs[torch.randperm(vecs.shape[0], generator=g)[:256]]
    codes = torch.cdist(vecs, cb).argmin(1).reshape(out_f, -1)[None]
    extra = {}
    if fmt.n_outliers:
        extra.update(perm=perm, outlier_w=wp[:, :fmt.n_outliers])
    if fmt.has_scale:
        extra["scale"] = 1 + 0.1 * torch.rand(out_f, generator=g)
    if fmt.has_bias:
        extra["bias"] = 0.1 * torch.randn(out_f, generator=g)
    return VQLinear.from_parts(fmt, codes, cb[None, None], **extra)


def vq_decoder() -> llama.LlamaForCausalLM:
    """A tiny decoder with every linear a VQLinear; one layer uses outliers + perm + scale + bias."""
    m = llama.init_random(CFG, seed=0)
    for i, layer in enumerate(m.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    kw = dict(n_outliers=4, has_scale=True, has_bias=True) if (i, name) == (1, "down_proj") else {}
                    setattr(parent, name, vq_from_linear(child, seed=i, **kw))
    return m.eval()


@pytest.fixture(scope="module")
def jetson(tmp_path_factory):
    """One export for the Jetson Orin Nano profile: host library, aarch64 library (qemu parity), CUDA sm_87."""
    model = vq_decoder()
    out = tmp_path_factory.mktemp("tvm") / "vq-jetson"
    # eager runs the op's fp32 reference: the default llvm eager kernel sums an fp16 LUT (~1e-4 relative drift)
    with table.force("reference"):
        art = export(model, format="tvm", target="jetson-orin-nano", out=out, max_seq_len=MAX_SEQ, golden_steps=32)
    return model, art


def eager_step(model, tokens, pos, k, v):
    with cache_installed(model, MAX_SEQ, lambda *a: StepKVCache()), torch.no_grad(), table.force("reference"):
        return [t.numpy() for t in DecoderStep(model)(tokens, pos, k, v)]


def step_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = [CFG.num_layers, 1, CFG.num_kv_heads, MAX_SEQ, CFG.head_dim]
    k, v = torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g) * 0.5
    return torch.tensor([[17]]), torch.tensor([5]), k, v


def test_host_golden_decode_and_manifest(jetson):
    _, art = jetson
    m = art.manifest
    assert m["format"] == "tvm" and m["file"] == "model.so"
    golden = m["parity"]["golden"]
    assert golden["identical"] and golden["steps"] == 32 and len(golden["tokens"]) == 32
    assert m["parity"]["max_abs"] <= m["parity"]["atol"] + m["parity"]["rtol"] * 10  # logits are O(1-10)
    assert m["compression"]["custom_ops"]["edgetk::codebook_gemm"] == {"count": 14, "lowering": "kernel"}
    assert set(m["tvm"]["builds"]) == {"host", "aarch64-linux-gnu", "cuda-sm_87"}
    # the tied embedding/lm_head matrix is one constant (not also a folded transposed copy)
    shapes = [c["shape"] for c in m["tvm"]["builds"]["host"]["constants"]["largest_float"]]
    assert shapes.count([CFG.vocab_size, CFG.hidden_size]) == 1 and [CFG.hidden_size, CFG.vocab_size] not in shapes


def test_session_matches_eager_on_fresh_inputs(jetson):
    model, art = jetson
    inputs = step_inputs()
    got = Session(art.root).run([t.numpy() for t in inputs])
    ref = eager_step(model, *inputs)
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


def test_aarch64_library_runs_under_qemu_and_matches_eager(jetson):
    from edgetk.devices.tvm_aarch64 import run_aarch64

    model, art = jetson
    build = art.manifest["tvm"]["builds"]["aarch64-linux-gnu"]
    assert build["target"]["mtriple"] == "aarch64-linux-gnu" and "+neon" in build["target"]["mattr"]
    assert build["parity"]["max_abs"] <= 1e-4 * 10
    golden = build["parity"]["golden"]  # prompt + 4 greedy steps, KV cache carried across qemu runs
    assert golden["identical"] and golden["steps"] == 4
    assert golden["tokens"] == art.manifest["parity"]["golden"]["tokens"][:4]
    lib = art.file(build["file"])
    assert lib.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine = EM_AARCH64
    inputs = step_inputs(seed=2)
    got = run_aarch64(lib, [t.numpy() for t in inputs])
    ref = eager_step(model, *inputs)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


def test_cuda_code_is_generated_and_kept(jetson):
    _, art = jetson
    build = art.manifest["tvm"]["builds"]["cuda-sm_87"]
    src = art.file(build["cuda"]["source"]).read_text()
    assert "codebook_gemm" in src and "__shfl_down_sync" in src  # the TIR kernel's warp reduction
    assert build["cuda"]["kernels"] >= 10
    assert build["host"]["mtriple"] == "aarch64-linux-gnu"  # Jetson's CPU side is aarch64
    assert art.file(build["file"]).read_bytes()[18:20] == (183).to_bytes(2, "little")
    if shutil.which("nvcc"):
        assert build["cuda"]["nvcc"] == "ok" and art.file(build["cuda"]["cubin"]).stat().st_size > 0


def test_no_dense_weight_at_run_time(jetson):
    """No constant bound into any library has the shape of a VQ layer's dense weight, and the constants add
    up to the compressed buffers plus the fp tensors (embedding, tied lm_head copy, RoPE tables, mask)."""
    model, art = jetson
    dense = {tuple(m.dequantize().shape) for m in model.modules() if isinstance(m, VQLinear)}
    dense |= {s[::-1] for s in dense}
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, VQLinear))
    vq_bytes = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, VQLinear)
                   for b in m.buffers())
    fp_bytes = 2 * CFG.vocab_size * CFG.hidden_size * 4 + 4 * CFG.max_seq_len * CFG.head_dim * 4 + MAX_SEQ ** 2
    for name, build in art.manifest["tvm"]["builds"].items():
        c = build["constants"]
        assert not {tuple(x["shape"]) for x in c["largest_float"]} & dense, (name, c)
        assert c["bytes"] < fp_bytes + vq_bytes + 8192 < fp_bytes + dense_bytes, (name, c)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),  # depthwise
            nn.MaxPool2d(2), nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def test_small_cnn_export_and_session(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    for bn in (model.body[1], model.body[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 16, 16)
    art = export(model, (x,), format="tvm", out=tmp_path / "cnn")
    assert art.manifest["parity"]["max_abs"] <= art.manifest["parity"]["outputs"]["output"]["limit"]
    x2 = torch.randn(1, 3, 16, 16)
    (got,) = Session(art.root).run([x2.numpy()])
    with torch.no_grad():
        ref = model(x2).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


class Cdist(nn.Module):
    def __init__(self):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.cdist(x, self.centers)


def test_unsupported_op_is_named_at_export_time(tmp_path):
    out = tmp_path / "cdist"
    with pytest.raises(UnsupportedOpError) as info:
        export(Cdist(), (torch.randn(3, 8),), format="tvm", out=out)
    msg = str(info.value)
    assert "cdist" in msg and "tvm" in msg and "node" in msg and "fall back" in msg
    assert not out.exists()


def test_dynamic_shapes_are_refused(tmp_path):
    batch = torch.export.Dim("batch", min=1, max=8)
    with pytest.raises(UnsupportedOpError, match="static shapes"):
        export(nn.Linear(4, 2), (torch.randn(2, 4),), format="tvm", out=tmp_path / "dyn",
               dynamic_shapes={"input": {0: batch}})


def test_unknown_triple_is_refused_before_building(tmp_path):
    with pytest.raises(UnsupportedOpError, match="arm64-apple-darwin"):
        export(nn.Linear(4, 2), (torch.randn(1, 4),), format="tvm", target="apple-m", out=tmp_path / "mac")
    assert not (tmp_path / "mac").exists()


def test_bad_library_and_bad_inputs_are_named(tmp_path, jetson):
    _, art = jetson
    with ArtifactWriter(tmp_path / "junk", kind="tvm", format="tvm", file="model.so",
                        inputs=art.manifest["inputs"], outputs=art.manifest["outputs"]) as w:
        w.path("model.so").write_bytes(b"\x7fELF not really a library")
    with pytest.raises(ArtifactError, match="TVM cannot load"):
        Session(tmp_path / "junk")
    copy = tmp_path / "copy"
    shutil.copytree(art.root, copy)
    data = (copy / "model.so").read_bytes()
    (copy / "model.so").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ArtifactError, match="truncated"):
        Session(copy)
    with pytest.raises(ArtifactError, match="takes 4 inputs"):
        Session(art.root).run([np.zeros((1, 1), np.int64)])
    assert json.loads((art.root / "manifest.json").read_text())["format"] == "tvm"
