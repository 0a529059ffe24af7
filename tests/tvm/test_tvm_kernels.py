"""TVM TensorIR codebook_gemm (kernels/tir_codebook.py) against the plain-PyTorch reference."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from edgetk.errors import ConfigError
from edgetk.kernels import codebook_gemm as cg

tvm = pytest.importorskip("tvm", reason="apache-tvm is the 'tvm' extra")
from edgetk.kernels import tir_codebook as tc  # noqa: E402

pytestmark = pytest.mark.backend
DT = dict(x_dtype="float32", codebook_dtype="float16", outlier_dtype="float16", scale_dtype="float16",
          bias_dtype="float16")


def make_layer(out_f, in_f, vec_len, bits, k, stages=1, groups=1, n_out=0, scale=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = cg.CodebookFormat(out_f, in_f, vec_len, bits, k, stages, groups, n_out, scale, bias)
    codes = cg.pack_codes(torch.randint(0, k, (stages, out_f, fmt.n_vec), generator=g), bits)
    cbs = torch.randn(stages, groups, k, vec_len, generator=g).half()
    e = torch.zeros(0)
    perm = torch.randperm(in_f, generator=g) if n_out else e.long()
    ow = torch.randn(out_f, n_out, generator=g).half() if n_out else e.half()
    sc = (torch.rand(out_f, generator=g) + 0.5).half() if scale else e.half()
    bi = torch.randn(out_f, generator=g).half() if bias else e.half()
    return fmt, (codes, cbs, perm, ow, sc, bi)


def shape_of(x, fmt, parts):
    codes, cbs, perm, ow, sc, bi = parts
    return tc.shape_from_tensors(tuple(x.shape), tuple(codes.shape), tuple(cbs.shape), perm.numel(), tuple(ow.shape),
                                 sc.numel(), bi.numel(), fmt.in_features, fmt.vec_len, fmt.code_bits, DT)


def run_llvm(x, fmt, parts, algo=None):
    k = shape_of(x, fmt, parts)
    lib = tc.build(k, {"kind": "llvm"}, algo)
    y = tvm.runtime.empty((k.rows, k.out_features), "float32")
    args = [tvm.runtime.tensor(np.ascontiguousarray(a.numpy())) for a in (x.reshape(k.rows, -1), *parts)]
    lib["codebook_gemm"](*args, y)
    return y.numpy().reshape(*x.shape[:-1], k.out_features)


CASES = {  # shape classes: square, tall, wide, odd sizes with every optional part, sub-byte and 16-bit codes
    "square-8bit": dict(out_f=64, in_f=64, vec_len=4, bits=8, k=256),
    "tall-6bit": dict(out_f=192, in_f=32, vec_len=2, bits=6, k=64, groups=4),
    "wide-12bit": dict(out_f=16, in_f=200, vec_len=8, bits=12, k=4096),
    "odd-5bit-outliers-scale-bias-2stages": dict(out_f=37, in_f=70, vec_len=4, bits=5, k=32, stages=2, n_out=6,
                                                 scale=True, bias=True),
    "2bit-padded": dict(out_f=24, in_f=30, vec_len=4, bits=2, k=4, bias=True),
    "16bit": dict(out_f=20, in_f=36, vec_len=2, bits=16, k=300, scale=True),
    "r16-4bit-2stages-groups": dict(out_f=48, in_f=64, vec_len=4, bits=4, k=16, stages=2, groups=3, scale=True),
}


@pytest.mark.parametrize("algo", ["direct", "lut"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tir_codebook_gemm_matches_reference(case, rows, algo):
    fmt, parts = make_layer(**CASES[case])
    x = torch.randn(rows, fmt.in_features, generator=torch.Generator().manual_seed(rows))
    ref = cg.codebook_gemm_reference(x, *parts, fmt.in_features, fmt.vec_len, fmt.code_bits).numpy()
    got = run_llvm(x, fmt, parts, algo)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_leading_dims_are_flattened():
    fmt, parts = make_layer(48, 40, 4, 8, 256, bias=True)
    x = torch.randn(2, 3, 40)
    ref = cg.codebook_gemm_reference(x, *parts, 40, 4, 8).numpy()
    got = run_llvm(x, fmt, parts)
    assert got.shape == (2, 3, 48)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("algo", ["direct", "lut"])
def test_no_dense_weight_in_the_primfunc(algo):
    """The kernel allocates activations, accumulators, the fp32 codebook and (LUT) the table, never [out, in]."""
    import dataclasses

    fmt, parts = make_layer(96, 128, 4, 8, 256, n_out=4, scale=True)
    k = dataclasses.replace(shape_of(torch.zeros(1, 128), fmt, parts), algo=algo)
    func = tc.codebook_gemm_primfunc(k)
    allocs = {b.name: int(np.prod([int(d) for d in b.shape])) for b in func.body.block.alloc_buffers}
    limits = {"xq": 128, "acc": 96, "oacc": 96, "cbt": 256 * 4, "lut": 31 * 256 if algo == "lut" else 1}
    assert allocs.keys() == limits.keys() and all(allocs[n] <= limits[n] for n in allocs), allocs
    assert max(allocs.values()) < 96 * 128


def test_algorithm_choice():
    big = tc.TirCodebookShape(rows=1, in_features=576, out_features=1536, vec_len=4, code_bits=8, stages=1, groups=1,
                              codebook_size=256, row_bytes=144)
    assert tc.choose_algo(big, "llvm") == "lut" and tc.choose_algo(big, "cuda") == "direct"
    small = tc.TirCodebookShape(rows=1, in_features=64, out_features=16, vec_len=4, code_bits=12, stages=1,
                                groups=1, codebook_size=4096, row_bytes=24)
    assert tc.choose_algo(small, "llvm") == "direct"  # a 4096-entry table per vector costs more than 16 rows


def test_cuda_codegen_warp_reduction_and_nvcc():
    """CUDA: code generation succeeds here (no GPU needed); one warp per output with shuffle reduction."""
    for n_out in (0, 6):
        fmt, parts = make_layer(64, 70, 4, 5, 32, n_out=n_out, scale=True, bias=True)
        k = shape_of(torch.zeros(1, 70), fmt, parts)
        tgt = tvm.target.Target({"kind": "cuda", "arch": "sm_87"}, host={"kind": "llvm"})
        lib = tc.build(k, tgt)
        src = "".join(m.inspect_source("cuda") for m in lib.mod.imports if m.kind == "cuda")
        assert "__global__" in src and "__shfl_down_sync" in src
        kernels = src.count("__global__ void") // 2  # declarations + definitions
        assert kernels == (1 if n_out == 0 else 3)  # epilogue fused into the reduction without outliers
        nvcc = shutil.which("nvcc")
        if nvcc:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "k.cu").write_text(src)
                for arch in ("sm_87", "sm_90"):
                    proc = subprocess.run([nvcc, "-w", f"-arch={arch}", "-cubin", "-o", f"{d}/k.cubin", f"{d}/k.cu"],
                                          capture_output=True, text=True)
                    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_schedule_and_bad_shapes_are_named():
    fmt, parts = make_layer(16, 16, 4, 8, 256)
    k = shape_of(torch.zeros(1, 16), fmt, parts)
    with pytest.raises(ConfigError, match="no TIR codebook_gemm schedule"):
        tc.scheduled_primfunc(k, "metal")
    codes, cbs, *rest = parts
    with pytest.raises(ConfigError, match="vec_len"):
        tc.shape_from_tensors((1, 16), tuple(codes.shape), tuple(cbs.shape), 0, (0,), 0, 0, 16, 8, 8, DT)
    with pytest.raises(ConfigError, match="bytes per row"):
        tc.shape_from_tensors((1, 16), (1, 16, 2), tuple(cbs.shape), 0, (0,), 0, 0, 16, 4, 8, DT)
    with pytest.raises(ConfigError, match="float32 activations"):
        tc.shape_from_tensors((1, 16), tuple(codes.shape), tuple(cbs.shape), 0, (0,), 0, 0, 16, 4, 8,
                              {**DT, "x_dtype": "float16"})


CHILD = """
import sys, numpy as np, torch
sys.path.insert(0, {here!r})
from test_tvm_kernels import make_layer, run_llvm, CASES
from edgetk.kernels import codebook_gemm as cg
import tvm_ffi
fmt, parts = make_layer(**CASES["odd-5bit-outliers-scale-bias-2stages"])
x = torch.randn(3, fmt.in_features, generator=torch.Generator().manual_seed(7))
ref = cg.codebook_gemm_reference(x, *parts, fmt.in_features, fmt.vec_len, fmt.code_bits).numpy()
for algo in ("direct", "lut"):
    got = run_llvm(x, fmt, parts, algo)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
print("threads", tvm_ffi.get_global_func("runtime.NumThreads")())
"""


def test_one_and_many_threads(tmp_path):
    """TVM sizes its thread pool once per process (capped at the core count): run the parallel schedules in a
    process with one thread and one with every core."""
    import os
    import sys
    from pathlib import Path

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(here=str(Path(__file__).parent)))
    for n in sorted({1, min(os.cpu_count() or 1, 4)}):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TVM_NUM_THREADS": str(n)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"threads {n}" in proc.stdout
