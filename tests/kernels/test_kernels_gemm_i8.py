"""The int8 prefill GEMM (llvm_gemm_i8, EDGETK_PREFILL=int8) against its own arithmetic spelled out in PyTorch
(`llvm_gemm_i8.reference`: exact int32 sums, so only float rounding differs) and against the float32 reference."""
from __future__ import annotations

import pytest
import torch

from edgetk.errors import ConfigError
from edgetk.kernels import codebook_gemm as cg
from edgetk.kernels import llvm_codebook as lk
from edgetk.kernels import llvm_common as lc
from edgetk.kernels import llvm_gemm_i8 as i8

from test_kernels_llvm_codebook import EXTRA, SHAPES, make_weight, snr_db

I8_SHAPES = ["square", "tall", "wide", "odd", "outliers_perm", "groups", "bits5", "k64", "large"]


def _cfg(shape):
    return SHAPES.get(shape) or EXTRA[shape]


def close_to_arithmetic(y, want):
    err = (y - want).abs().max().item()
    assert err <= 2e-6 * want.abs().max().item(), f"max abs error {err}"


@pytest.mark.parametrize("shape", I8_SHAPES)
@pytest.mark.parametrize("tokens", [2, 5, 13])
@pytest.mark.parametrize("threads", [1, 3])
def test_int8_prefill_is_its_arithmetic_and_near_the_reference(shape, tokens, threads):
    """Token blocks with a tail (5, 13 tokens), rows not a multiple of the 16-row block (37, 24), inputs not a
    multiple of the 64-input activation group, 3- and 5-wide codewords, output groups, outliers with a permutation,
    scale and bias; SNR against the float32 reference like int8 activations (>= 30 dB; measured 34-40)."""
    out, inf, v, K, bits, *_ = cfg = _cfg(shape)
    w = make_weight(*cfg)
    p = i8.pack_weight(*w, inf, v, bits)
    assert p is not None
    x = torch.randn(tokens, inf)
    y = i8.gemm(p, x, threads)
    close_to_arithmetic(y, i8.reference(p, x))
    assert snr_db(y, cg.codebook_gemm_reference(x, *w, inf, v, bits)) >= 30


def test_every_runnable_isa_gives_the_same_bits():
    """The host's multiply-add (AVX2 `vpmaddubsw`, AVX-512BW, VNNI `vpdpbusd`) and the plain-IR form sum the
    same int32 products: bit-identical outputs."""
    out, inf, v, K, bits, *_ = cfg = _cfg("large")
    w = make_weight(*cfg)
    p = i8.pack_weight(*w, inf, v, bits)
    x = torch.randn(9, inf)
    host = i8.gemm(p, x, 2)
    generic = i8.gemm(p, x, 2, isa="generic")
    assert torch.equal(host, generic)


def test_extreme_values_do_not_saturate():
    """Every activation at the group maximum and every codeword byte at the extreme with the same sign: the
    largest pair sums the int16 step of `vpmaddubsw` can meet; the kernel still equals its exact arithmetic."""
    out, inf = 32, 256
    codes = cg.pack_codes(torch.arange(out * inf // 4).reshape(1, out, inf // 4) % 2, 8)  # both signs
    cb = torch.full((1, 1, 256, 4), 3.0).half()
    cb[0, 0, 1] = -3.0
    empty = torch.empty(0)
    w = (codes, cb, torch.empty(0, dtype=torch.int64), empty, empty, empty)
    p = i8.pack_weight(*w, inf, 4, 8)
    for x in (torch.full((4, inf), 5.0), torch.full((4, inf), -5.0)):
        y = i8.gemm(p, x, 1)
        close_to_arithmetic(y, i8.reference(p, x))
        torch.testing.assert_close(y, cg.codebook_gemm_reference(x, *w, inf, 4, 8), rtol=1e-5, atol=0)
    x = torch.zeros(3, inf)  # a zero group: scale 0, no division by zero
    assert torch.equal(i8.gemm(p, x, 1), torch.zeros(3, out))


def test_non_finite_inputs_stay_non_finite():
    """A NaN or infinite activation makes its token's outputs non-finite (as the float32 paths do, so the LLM
    runtime's finite-logits check still fires); the other tokens are untouched."""
    out, inf, v, K, bits, *_ = cfg = _cfg("square")
    w = make_weight(*cfg)
    p = i8.pack_weight(*w, inf, v, bits)
    x = torch.randn(6, inf)
    clean = i8.gemm(p, x, 1)
    x[1, 5], x[4, 60] = float("nan"), float("inf")
    y = i8.gemm(p, x, 1)
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[4]).any()
    keep = [0, 2, 3, 5]
    assert torch.equal(y[keep], clean[keep])


@pytest.mark.parametrize("isa,cpu,pattern", [("avx2", "znver3", "vpmaddubsw\t%ymm"),
                                             ("avx512bw", "skylake-avx512", "vpmaddubsw\t%zmm"),
                                             ("vnni512", "sapphirerapids", "vpdpbusd\t%zmm")])
def test_x86_objects_use_the_int8_multiply_add(isa, cpu, pattern):
    """Each x86 form compiles to its instruction (checked in the assembly for CPUs this host may not be)."""
    asm = lc.emit_assembly(i8.build_module(isa, 4, "x86_64-unknown-linux-gnu"), "x86_64-unknown-linux-gnu", cpu)
    assert pattern in asm


def test_int8_prefill_mode_routes_and_falls_back(monkeypatch):
    """EDGETK_PREFILL=int8 sends batch > 1 through llvm_gemm_i8 (batch 1 keeps the gemv); residual codebooks go to
    the LUT GEMM; a host without an int8 multiply-add runs the dense float32 path; "auto" never picks int8."""
    cfg = SHAPES["outliers_perm"]
    out, inf, v, K, bits, *_ = cfg
    w = make_weight(*cfg)
    x = torch.randn(6, inf)
    p = i8.pack_weight(*w, inf, v, bits)
    base = lk.pack_weight(*w, inf, v, bits)
    monkeypatch.setenv("EDGETK_PREFILL", "int8")
    assert lk.prefill_mode() == "int8"
    want = "int8" if i8.host_ok() else "dense"
    assert lk.prefill_choice(base, 6, "int8") == want
    y = lk.codebook_gemm_llvm(x, *w, inf, v, bits)
    if want == "int8":
        assert torch.equal(y, i8.gemm(p, x))
    x1 = torch.randn(1, inf)
    torch.testing.assert_close(lk.codebook_gemm_llvm(x1, *w, inf, v, bits),
                               cg.codebook_gemm_reference(x1, *w, inf, v, bits), rtol=1e-5, atol=1e-5)
    res = SHAPES["residual"]
    wr, xr = make_weight(*res), torch.randn(3, res[1])
    assert i8.pack_weight(*wr, res[1], res[2], res[4]) is None
    assert lk.prefill_choice(lk.pack_weight(*wr, res[1], res[2], res[4]), 3, "int8") == "lut"
    torch.testing.assert_close(lk.codebook_gemm_llvm(xr, *wr, res[1], res[2], res[4]),
                               cg.codebook_gemm_reference(xr, *wr, res[1], res[2], res[4]), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(i8, "host_ok", lambda: False)
    assert lk.prefill_choice(base, 6, "int8") == "dense"
    torch.testing.assert_close(lk.codebook_gemm_llvm(x, *w, inf, v, bits),
                               cg.codebook_gemm_reference(x, *w, inf, v, bits), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(i8, "host_ok", lambda: True)
    for precision in ("highest", "medium"):  # "auto" never picks int8, whatever the matmul precision
        prev = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision(precision)
            assert lk.prefill_choice(base, 64) != "int8"
        finally:
            torch.set_float32_matmul_precision(prev)
    monkeypatch.setenv("EDGETK_PREFILL", "int4")
    with pytest.raises(ConfigError, match="int8"):
        lk.prefill_mode()


def test_cli_prefill_option_takes_int8():
    from edgetk.cli.common import prefill_path

    with prefill_path("int8"):
        assert lk.prefill_mode() == "int8"
    with pytest.raises(ConfigError, match="prefill mode"):
        with prefill_path("int4"):
            pass
