"""The aarch64 (NEON) object emitted by the llvmlite generator, run under qemu-aarch64, vs the reference."""
from __future__ import annotations

import re

import pytest
import torch

from edgetk.kernels import aarch64_check as ac
from edgetk.kernels import codebook_gemm as cg
from edgetk.kernels import llvm_codebook as lk
from edgetk.kernels import llvm_codebook_q8 as q8
from edgetk.kernels import llvm_common as lc

from test_kernels_llvm_codebook import EXTRA, SHAPES, check, lut_bound, make_weight, snr_db, vnni_model

pytestmark = pytest.mark.skipif(not ac.tools_available(), reason="needs gcc-aarch64-linux-gnu and qemu-user")


def test_object_is_aarch64_with_neon():
    spec = lk.make_spec(4, 256, 1, 64, False, vector_bits=ac.NEON_BITS)
    asm = lc.emit_assembly(lk.build_module(spec, ac.TRIPLE), ac.TRIPLE)
    assert "fmla" in asm and "v0.4s" in asm.replace("v1.4s", "v0.4s")
    assert lc.emit_object(lk.build_module(spec, ac.TRIPLE), ac.TRIPLE)[:4] == b"\x7fELF"


def test_fp32_gemv_emits_neon_fma():
    """The runtime's one-row fp32 GEMV (llvm_gemv_f32: JIT-compiled on the device itself) for aarch64: 4-lane
    NEON FMAs over the row block."""
    from edgetk.kernels import llvm_gemv_f32 as gv

    asm = lc.emit_assembly(gv.build_module(4, ac.TRIPLE), ac.TRIPLE)
    assert asm.count("fmla\tv") >= 2 * gv.RB and ".4s" in asm
    assert lc.emit_object(gv.build_module(4, ac.TRIPLE), ac.TRIPLE)[:4] == b"\x7fELF"


def test_fp32_few_rows_kernel_emits_neon_fma():
    """The few-row fp32 kernel (llvm_gemv_f32.gemm_rows: draft-tree steps of plain layers) for aarch64: one 4-lane
    NEON FMA per input and weight vector."""
    from edgetk.kernels import llvm_gemv_f32 as gv

    asm = lc.emit_assembly(gv.build_rows_module(4, 5, ac.TRIPLE), ac.TRIPLE)
    assert asm.count("fmla\tv") >= 5 and ".4s" in asm
    assert lc.emit_object(gv.build_rows_module(4, 5, ac.TRIPLE), ac.TRIPLE)[:4] == b"\x7fELF"


@pytest.mark.parametrize("shape,rows,threads", [("outliers_perm", 1, 2), ("groups_odd_rows", 1, 1),
                                                ("residual", 7, 2), ("bits12", 1, 1), ("groups", 3, 2),
                                                ("outliers_perm", 21, 3)])
def test_aarch64_kernel_under_qemu(tmp_path, shape, rows, threads):
    out, inf, v, K, bits, stages, groups, *_ = SHAPES[shape]
    w = make_weight(*SHAPES[shape])
    p = lk.pack_weight(*w, inf, v, bits, vector_bits=ac.NEON_BITS)
    exe = ac.build(p.spec, tmp_path)
    x = torch.randn(rows, inf)  # prefill: 3 rows = one batch tile (split by rows), 7 / 21 rows (by batch tiles)
    check(ac.run(exe, p, x, threads, tmp_path), cg.codebook_gemm_reference(x, *w, inf, v, bits))


@pytest.mark.parametrize("shape,threads", [("large", 3), ("groups", 2), ("outliers_perm", 2), ("odd", 1),
                                           ("bits12", 3)])
def test_aarch64_split_k_gemv_under_qemu(tmp_path, shape, threads):
    """The float32 gemv split over code columns (`gemvk`: what a device runs on 2+ threads) on aarch64, pthreads
    ranges that start and end inside JB blocks ("large": 512 code columns on 3 threads)."""
    out, inf, v, K, bits, *_ = cfg = SHAPES.get(shape) or EXTRA[shape]
    w = make_weight(*cfg)
    p = lk.pack_weight(*w, inf, v, bits, vector_bits=ac.NEON_BITS)
    x = torch.randn(1, inf)
    check(ac.run(ac.build(p.spec, tmp_path), p, x, threads, tmp_path, kernel="f32k"),
          cg.codebook_gemm_reference(x, *w, inf, v, bits))


def test_q8_object_uses_neon_table_lookups():
    spec = q8.make_spec(4, 256, 1, 64, False, isa="neon")
    asm = lc.emit_assembly(q8.build_module(spec, "neon", ac.TRIPLE), ac.TRIPLE)
    assert asm.count("tbl\t") >= 1 and asm.count("tbx\t") >= 3  # 256 entries: tbl over 64, then three tbx
    spec = q8.make_spec(4, 16, 2, 64, False, isa="neon")
    asm = lc.emit_assembly(q8.build_module(spec, "neon", ac.TRIPLE), ac.TRIPLE)
    assert spec.nibbles and spec.K == 16 and "tbx\t" not in asm
    assert re.search(r"tbl\tv\d+\.16b, \{ ?v\d+\.16b ?\}", asm)  # 16 entries: one tbl over one register


@pytest.mark.parametrize("shape,threads", [("outliers_perm", 2), ("residual", 1), ("bits5", 2), ("odd", 1),
                                           ("r16_odd_block", 2)])
def test_q8_neon_gemv_under_qemu(tmp_path, shape, threads):
    """The NEON int8-LUT gemv from the same generator as the x86 ones, within the LUT rounding bound (r16: 4-bit
    codes as nibbles, 16-entry tables)."""
    cfg = SHAPES.get(shape) or EXTRA[shape]
    out, inf, v, K, bits, *_ = cfg
    w = make_weight(*cfg)
    p = q8.pack_weight(*w, inf, v, bits, isa="neon")
    exe = ac.build(p.spec, tmp_path, kernel="q8")
    x = torch.randn(1, inf)
    y = ac.run(exe, p, x, threads, tmp_path, kernel="q8")
    ref = cg.codebook_gemm_reference(x, *w, inf, v, bits)
    err = (y - ref).abs().max().item()
    assert 0 < err <= lut_bound(x, w, inf, v, q8.QMAX) and snr_db(y, ref) >= 30


def test_q8_neon_dot_product_lut_build_emits_sdot():
    """On a dot-product core (ARMv8.2+) the int8 LUT is built with `sdot` (4 codewords an instruction) and rescaled
    with `sqrdmulh`, not with float FMAs; without it the float build stays."""
    spec = q8.make_spec(4, 256, 1, 64, False, isa="neon", vnni=True)
    assert spec.int_lut
    asm = lc.emit_assembly(q8.build_module(spec, "neon", ac.TRIPLE), ac.TRIPLE, ac.I8_CPU["dot"])
    f32 = lc.emit_assembly(q8.build_module(q8.make_spec(4, 256, 1, 64, False, isa="neon"), "neon", ac.TRIPLE),
                           ac.TRIPLE)
    assert asm.count("sdot\tv") >= 64 and "sqrdmulh\tv" in asm  # a column's 256 codewords, 4 an instruction
    assert "sdot" not in f32 and asm.count("fmla\tv") + 32 <= f32.count("fmla\tv")  # FMAs left: the tile epilogue


@pytest.mark.parametrize("shape,threads", [("square", 1), ("outliers_perm", 2), ("residual", 1), ("k11_v3", 2),
                                           ("r16_odd_block", 2), ("large", 3), ("k64", 1)])
def test_q8_neon_dot_product_gemv_under_qemu(tmp_path, shape, threads):
    """The `sdot` LUT build for aarch64 under qemu: the integer model of the build (`vnni_model`, the same one the
    x86 VNNI kernels match; here signed codebook bytes) to float rounding, and >= 30 dB from the reference."""
    cfg = SHAPES.get(shape) or EXTRA[shape]
    out, inf, v, K, bits, *_ = cfg
    w = make_weight(*cfg)
    p = q8.pack_weight(*w, inf, v, bits, isa="neon", vnni=True)
    assert p.spec.int_lut
    x = torch.randn(1, inf)
    y = ac.run(ac.build(p.spec, tmp_path, kernel="q8"), p, x, threads, tmp_path, kernel="q8")
    want = vnni_model(p, x, w, inf, v, bits)
    torch.testing.assert_close(y[0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert snr_db(y, cg.codebook_gemm_reference(x, *w, inf, v, bits)) >= 30


@pytest.mark.parametrize("isa,shape,rows,threads", [("dot", "outliers_perm", 7, 2), ("dot", "odd", 5, 1),
                                                    ("generic", "groups", 9, 3)])
def test_int8_prefill_under_qemu(tmp_path, isa, shape, rows, threads):
    """The int8 prefill GEMM for aarch64 (a dot-product core: `sdot`; any NEON core: plain IR), activation
    quantization and row blocks both run under qemu: the same bytes, scales and outputs as the host's kernel."""
    from edgetk.kernels import llvm_gemm_i8 as i8

    out, inf, v, K, bits, *_ = cfg = SHAPES[shape]
    w = make_weight(*cfg)
    p = i8.pack_weight(*w, inf, v, bits)
    asm = lc.emit_assembly(i8.build_module(isa, v, ac.TRIPLE), ac.TRIPLE, ac.I8_CPU[isa])
    assert ("sdot\tv" in asm) == (isa == "dot")
    x = torch.randn(rows, inf)
    y, (xu, sx) = ac.run_i8(ac.build_i8(isa, v, tmp_path), p, x, threads, tmp_path)
    want_u, want_s = i8.quantize_activations(i8._inputs(p, x)[1])
    assert torch.equal(xu, want_u) and torch.equal(sx, want_s)
    assert torch.equal(y, i8.gemm(p, x, threads))
    assert snr_db(y, cg.codebook_gemm_reference(x, *w, inf, v, bits)) >= 30


def test_instruction_counts_under_qemu_show_the_sdot_build_does_less_work(tmp_path):
    """`instructions_per_call` (qemu -singlestep, two calls minus one; benchmarks/neon_icount.py) on the LUT build's
    share: one 64-row tile over 576 inputs, where the table build dominates. The sdot build executes well under
    the float build's instructions (measured 76 k vs 187 k a call), and a second weight twice as tall adds the
    same lookups to both."""
    w = make_weight(64, 576, 4, 256, 8, 1, 1, 0, True, False)
    w2 = make_weight(128, 576, 4, 256, 8, 1, 1, 0, True, False)
    x = torch.randn(1, 576)
    n = {}
    for vnni in (False, True):
        for rows, wt in ((64, w), (128, w2)):
            p = q8.pack_weight(*wt, 576, 4, 8, isa="neon", vnni=vnni)
            d = tmp_path / f"{vnni}_{rows}"
            n[vnni, rows] = ac.instructions_per_call(ac.build(p.spec, d, kernel="q8"), p, x, 1, d, "q8")
    assert n[True, 64] * 2 < n[False, 64]
    lookups = [n[v, 128] - n[v, 64] for v in (False, True)]
    assert lookups[0] > 0 and abs(lookups[0] - lookups[1]) <= 0.02 * lookups[0]


def test_neon_icount_benchmark_runs():
    """benchmarks/neon_icount.py end to end on one small shape: a JSON line per shape with the three kernels."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "neon_icount.py"
    res = subprocess.run([sys.executable, str(script), "--shapes", "64x128"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.splitlines()[0])
    assert r["shape"] == "64x128" and all(r[f"{k}_instructions"] > 0 for k in ("f32", "q8", "q8_sdot"))
    assert r["q8_sdot_instructions"] < r["q8_instructions"]
